"""The child process that runs llama.cpp's HTTP server for ``adapters.llamacpp``.

``python -m adapters.llamacpp_server MODEL_PATH --alias A --n-ctx N --threads T
--parallel P`` loads one GGUF model into ``xllamacpp.Server`` (llama.cpp's own
C++ server, embedded) listening on 127.0.0.1 on a port the kernel picks, and
writes one line, ``listening http://127.0.0.1:PORT``, to its standard output.
Everything else it or llama.cpp prints goes to its standard error, which the
adapter points at a log file: standard output is reserved for that one line,
since ``dovecote serve --stdio`` speaks to the editor on its own.

It runs in its own process so that a crash in native code, or a ``kill``,
never takes the engine down with it, and so that it can be restarted. It
exits when its standard input reaches end of file, which is what the parent's
end looks like however the parent ended (closed cleanly or killed): no
orphan server is left holding the model in memory.

This module imports nothing of dovecote: it starts fast and knows only
llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adapters.llamacpp_server")
    parser.add_argument("model_path")
    parser.add_argument("--alias", default="local")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args(argv)

    # The address line goes out on a copy of stdout; fd 1 itself is pointed at
    # stderr (the log) so that nothing native code prints can reach the parent's
    # pipe and be taken for the address.
    announce = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model_path
    params.model_alias = args.alias
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.n_ctx = args.n_ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_slots = True
    server = xllamacpp.Server(params)
    announce.write(f"listening {server.listening_address}\n")
    announce.flush()
    # Block until the parent goes away; then leave at once, without running
    # llama.cpp's destructors (nothing is left to save, and they can be slow).
    while sys.stdin.buffer.read(4096):
        pass
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
