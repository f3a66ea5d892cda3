#!/bin/sh
# dovecote eval and export on the scripted adapter (no network, no key).
#
#   sh examples/eval.sh            # a scratch database; or DOVECOTE_DB=... to keep it
#
# Each data set line is a call made by a resumable `eval` flow: run it twice
# and the second run calls nothing. Then the same calls as a chat data set.
set -eu
here=$(dirname "$0")
db=${DOVECOTE_DB:-$(mktemp -d)/dovecote.db}
dovecote --db "$db" eval "$here/eval_dataset.jsonl" --adapter scripted --check exact
dovecote --db "$db" export --format chat --flow eval
