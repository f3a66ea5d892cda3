;;; dovecote.el --- Asynchronous LLM corrections, merged as you type  -*- lexical-binding: t; -*-

;; Copyright (C) 2025 The dovecote authors

;; Author: The dovecote authors
;; Maintainer: The dovecote authors
;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1") (jsonrpc "1.0.14"))
;; Keywords: convenience, tools, wp
;; URL: https://github.com/dovecote/dovecote

;; This file is not part of GNU Emacs.

;; Permission is hereby granted, free of charge, to any person
;; obtaining a copy of this software, to deal in it without
;; restriction (MIT license; see the LICENSE of the dovecote project).

;;; Commentary:

;; The Emacs client of dovecote, a flow engine for LLM calls.  It talks
;; to `dovecote serve --stdio' over JSON-RPC with Emacs' own jsonrpc.el.
;;
;; Turn on `dovecote-mode' in a buffer: the buffer becomes a document
;; the server mirrors, change by change.  Select a region and run
;; `dovecote-correct-region': it starts the server's built-in
;; "corrections" flow on the region and returns at once; you keep
;; typing (before, inside or after the region), and when the model's
;; reply arrives the server merges it three ways (the region as it was
;; when you asked, as it is now, and the reply) and the merged edit
;; lands in the buffer.  The mode line shows how many calls are pending.
;;
;; A call that misses its deadline is dead-lettered (a correction's flow
;; then stalls): `dovecote-list-dead-letters' lists them, and `r'
;; replays one; a stalled correction then goes on and lands.
;; Where your edit and the model's collide, `dovecote-on-conflict'
;; decides; with "ask" (the default) the collisions open in a
;; `smerge-mode' buffer, resolved with the usual smerge keys and sent
;; back with \\[dovecote-conflict-finish].
;;
;; A minimal set-up (dovecote checked out in ~/src/dovecote, where
;; `make demo' made the .venv):
;;
;;   (add-to-list 'load-path "~/src/dovecote/editor_bridge/emacs")
;;   (require 'dovecote)
;;   (setq dovecote-server-command
;;         '("~/src/dovecote/.venv/bin/dovecote" "serve" "--stdio"))
;;   (global-set-key (kbd "C-c d") 'dovecote-command-map)
;;   (add-hook 'text-mode-hook #'dovecote-turn-on)
;;
;; `dovecote-turn-on' turns the mode on only in buffers that visit a
;; file: not in temporary buffers that happen to run `text-mode-hook'.

;;; Code:

(require 'cl-lib)
(require 'jsonrpc)
(require 'smerge-mode)
(require 'subr-x)
(require 'tabulated-list)

;;;; Customization

(defgroup dovecote nil
  "Asynchronous LLM calls merged into the text you keep editing."
  :group 'tools
  :prefix "dovecote-")

(defcustom dovecote-server-command '("dovecote" "serve" "--stdio")
  "The command that starts the dovecote server, a program and its arguments.
The server must speak JSON-RPC on its standard input and output; add
\"--db\" and a file name to use another database than the default."
  :type '(repeat string))

(defcustom dovecote-server-directory nil
  "The directory the server runs in, or nil for the first buffer's.
The server's database is found from there by dovecote's default rule
\(unless `dovecote-server-command' gives \"--db\" or DOVECOTE_DB is
set): the nearest .dovecote/dovecote.db in that directory or its
parents, else the user's data directory; the `dovecote' command in a
shell follows the same rule, so `dovecote dead' there shows the calls
made here.  nil runs it in the `default-directory' of the buffer that
first needs it, kept for the rest of the Emacs session so that a
restarted server finds the calls still pending."
  :type '(choice (const :tag "The first buffer's directory" nil) directory))

(defcustom dovecote-adapter "scripted"
  "The name of the adapter (model provider) that serves corrections.
\"scripted\" needs no network and no key; others are configured in the
server's dovecote.toml."
  :type 'string)

(defcustom dovecote-correction-instruction
  "Correct the spelling and grammar of the text. Change nothing else: \
keep its wording, line breaks and formatting. Reply with the corrected \
text only."
  "The instruction sent as the system prompt of a correction."
  :type 'string)

(defcustom dovecote-on-conflict "ask"
  "What happens where your edit and the model's collide.
\"ask\" keeps your text and opens the collisions in a `smerge-mode'
buffer for you to resolve; \"drop\" keeps your text; \"markers\" writes
diff3 conflict markers into the buffer; \"theirs\" takes the model's."
  :type '(choice (const "ask") (const "drop") (const "markers") (const "theirs")))

(defcustom dovecote-default-timeout nil
  "Seconds a call may take before it is dead-lettered, or nil.
nil leaves the adapter's own timeout.  Let-bind it around a call to set
that call's timeout."
  :type '(choice (const :tag "The adapter's default" nil) number))

(defcustom dovecote-replay-timeout nil
  "Seconds a replayed dead letter may take, or nil.
nil uses `dovecote-default-timeout', and when that is nil too the
timeout of the call that died."
  :type '(choice (const :tag "As before" nil) number))

(defcustom dovecote-human-answer-function #'dovecote-read-human-answer
  "Function that answers a question a call puts to a person.
It is called with two arguments, the question as a string and the
params of the `human/ask' notification (a plist with `:commandId',
`:messages' and maybe `:system'), and returns the answer, a string,
or nil to leave the question unanswered."
  :type 'function)

(defcustom dovecote-reconnect-delay 0.2
  "Seconds to wait before restarting a server that died.
Each failed attempt doubles the wait, up to a minute."
  :type 'number)

(defcustom dovecote-events-buffer-size 0
  "Size of the JSON-RPC events log buffer; 0 keeps no log, nil no limit."
  :type '(choice (const :tag "No limit" nil) integer))

(defcustom dovecote-finished-functions nil
  "Functions called when one of this Emacs' calls reaches a terminal state.
Each is called with the call's id and its state, \"done\", \"dead\" or
\"cancelled\".  The call of a correction is the command of its flow's
step: a dead one stalls the correction until it is replayed."
  :type 'hook)

(defface dovecote-pending
  '((t :inherit secondary-selection))
  "Face of a region whose correction is pending.")

(defface dovecote-stalled
  '((t :inherit warning :underline t))
  "Face of a region whose correction is stalled: its call died.
It waits for a decision: replay its dead letter (see
`dovecote-list-dead-letters') or cancel it (`dovecote-cancel').")

(defface dovecote-progress
  '((t :inherit shadow :slant italic))
  "Face of the streamed reply shown after a pending region.")

;;;; State

(defvar dovecote-mode) ; Defined by `define-minor-mode' below.

(defvar dovecote--connection nil
  "The `jsonrpc-process-connection' to the server, shared by all buffers.")

(defvar dovecote--commands (make-hash-table :test #'equal)
  "This Emacs' calls not yet in a terminal state: id -> plist.
The plist has `:state', and maybe `:buffer', `:overlay', `:callback'.")

(defvar dovecote--history (make-hash-table :test #'equal)
  "This Emacs' calls and corrections, finished ones too: id -> plist.
The plist has `:kind' (`command' or `flow'), `:state', `:created',
`:adapter', `:buffer' (a buffer name), `:text' (the first line of
what was asked), for a correction `:command' (its step's call), and
`:conflicts' (non-nil once it had conflicts kept to resolve).
`dovecote-list-commands' shows it.")

(defvar dovecote--unclaimed (make-hash-table :test #'equal)
  "Last `command/state' params of calls whose id has not come back yet.
A state notification may overtake the response that names the call.")

(defvar dovecote--flows (make-hash-table :test #'equal)
  "This Emacs' corrections whose flows are not yet terminal: id -> plist.
The plist has `:state' (the flow's last known state), `:command' and
`:command-state' (its step's command, once known), `:buffer',
`:overlay', `:conn' (the connection that started the flow, the only
one the server sends its `flow/state' to) and `:asking' (the
connection on which a `flow/show' about it is in flight, or nil).")

(defvar dovecote--step-commands (make-hash-table :test #'equal)
  "Command id -> flow id, for the step commands of `dovecote--flows'.")

(defvar dovecote--unclaimed-flows (make-hash-table :test #'equal)
  "Notifications about flows whose id has not come back yet.
Flow id -> list of (METHOD . PARAMS), the most recent first.")

(defvar dovecote--expected 0
  "Number of calls and flows asked for whose ids have not come back yet.")

(defvar dovecote--poll-timer nil
  "Timer that asks the server about flows it does not report, or nil.")

(defvar dovecote--poll-due 0
  "When `dovecote--poll-timer' runs, as a `float-time'.")

(defvar dovecote--poll-interval 1.0
  "Seconds between two `flow/show' of a flow whose state is not reported.
The server sends `flow/state' only to the connection that started the
flow; after a reconnect the client asks instead.")

(defvar dovecote--reconnect-timer nil
  "Timer that restarts a server that died, or nil.")

(defvar dovecote--reconnect-wait nil
  "Seconds before the next restart attempt, or nil before a failure.")

(defvar dovecote--shutting-down nil
  "Non-nil while the server is stopped on purpose: no restart then.")

(defvar dovecote--connecting nil
  "Non-nil while the server is being started and initialized.")

(defvar-local dovecote--uri nil
  "The document URI of this buffer on the server.")

(defvar-local dovecote--version 0
  "The document version of this buffer; it grows with every change.")

(defvar-local dovecote--size 0
  "The buffer's size after the last change reported.")

(defvar-local dovecote--opened nil
  "The connection on which this buffer's document is open, or nil.")

;;;; Connection

(defun dovecote--live ()
  "Return the connection to the server if it is running, else nil."
  (and dovecote--connection
       (jsonrpc-running-p dovecote--connection)
       dovecote--connection))

(defun dovecote--process ()
  "Return the server process, or nil when there is none."
  (and dovecote--connection (jsonrpc--process dovecote--connection)))

(defvar dovecote--server-root nil
  "The directory the server of this Emacs session runs in, once started.")

(defvar dovecote--starting nil
  "The connection whose `initialize' is in flight, or nil.")

(defvar dovecote--start-failure nil
  "Why the last start of the server failed, or nil.")

(defvar dovecote--failure-reported nil
  "Non-nil once a failure to start the server was reported this session.
Buffers that turn the mode on are not told again: one message per
Emacs run, and the mode line shows `!'.")

(defvar dovecote--was-connected nil
  "Non-nil once a server answered this session: a death is then restarted.")

(defun dovecote--ensure ()
  "Return a live connection, starting the server and waiting if needed.
Only a command that needs the server waits for it; turning the mode
on does not (see `dovecote--start')."
  (or (dovecote--live)
      (progn
        (unless dovecote--connecting
          (setq dovecote--start-failure nil)
          (dovecote--start))
        (let ((deadline (+ (float-time) 30)))
          (while (and dovecote--connecting (< (float-time) deadline))
            (accept-process-output nil 0.02)))
        (or (dovecote--live)
            (user-error "Cannot start the dovecote server: %s \
\(see `dovecote-server-command')"
                        (or dovecote--start-failure "it did not answer"))))))

(defun dovecote--server-command ()
  "Return `dovecote-server-command', its program's file name expanded."
  (let ((program (car-safe dovecote-server-command)))
    (if (and (stringp program) (file-name-directory program))
        (cons (expand-file-name program) (cdr dovecote-server-command))
      dovecote-server-command)))

(defun dovecote--server-directory ()
  "Return the directory to start the server in (see `dovecote-server-directory')."
  (let ((directory (or dovecote-server-directory dovecote--server-root
                       default-directory)))
    (file-name-as-directory
     (expand-file-name (if (and (stringp directory) (file-directory-p directory))
                           directory
                         temporary-file-directory)))))

(defun dovecote--start ()
  "Start the server and initialize it without waiting; nil if running.
When it answers, every buffer in `dovecote-mode' is opened on it and
the calls still pending are watched on it (`dovecote--connected')."
  (unless (or (dovecote--live) dovecote--connecting)
    (when dovecote--reconnect-timer
      (cancel-timer dovecote--reconnect-timer)
      (setq dovecote--reconnect-timer nil))
    (when-let ((old dovecote--connection))
      (setq dovecote--connection nil)
      (let ((dovecote--shutting-down t))
        (ignore-errors (jsonrpc-shutdown old))))
    (setq dovecote--connecting t)
    (let* ((name "dovecote")
           (command (dovecote--server-command))
           (default-directory (dovecote--server-directory))
           (conn
            (condition-case err
                (progn
                  (unless (and (consp command) (stringp (car command))
                               (executable-find (car command)))
                    (error "No program %S" (car-safe command)))
                  (make-instance
                   'jsonrpc-process-connection
                   :name name
                   :events-buffer-scrollback-size dovecote-events-buffer-size
                   :process (lambda ()
                              (make-process
                               :name name
                               :command command
                               :connection-type 'pipe
                               :coding 'utf-8-emacs-unix
                               :noquery t
                               :stderr (get-buffer-create
                                        (format "*%s stderr*" name))))
                   :request-dispatcher #'dovecote--handle-request
                   :notification-dispatcher #'dovecote--handle-notification
                   :on-shutdown #'dovecote--on-shutdown))
              (error (dovecote--start-failed
                      nil (format "%S: %s" command (error-message-string err)))
                     nil))))
      (when conn
        (setq dovecote--starting conn
              dovecote--server-root default-directory)
        (jsonrpc-async-request
         conn 'initialize
         (list :clientInfo (list :name "emacs" :version emacs-version))
         :success-fn (lambda (_result) (dovecote--connected conn))
         :error-fn (lambda (err)
                     (dovecote--start-failed
                      conn (format "%S did not start: %s%s" command
                                   (plist-get err :message)
                                   (dovecote--stderr conn))))
         :timeout-fn (lambda ()
                       (dovecote--start-failed
                        conn (format "%S did not answer" command)))
         :timeout 30)
        conn))))

(defun dovecote--connected (conn)
  "Make CONN, whose server answered `initialize', the connection of all buffers."
  (when (eq conn dovecote--starting)
    (let ((again dovecote--was-connected))
      (setq dovecote--starting nil
            dovecote--connecting nil
            dovecote--connection conn
            dovecote--reconnect-wait nil
            dovecote--start-failure nil
            dovecote--failure-reported nil
            dovecote--was-connected t)
      (dolist (buffer (dovecote--buffers))
        (with-current-buffer buffer (dovecote--open conn)))
      (dovecote--watch conn)
      (force-mode-line-update t)
      (when again (message "dovecote: reconnected")))))

(defun dovecote--start-failed (conn why)
  "Record that the start of the server on CONN (or before it) failed, WHY.
A server that answered before and died is tried again later, each
time after a longer wait; one that never started is reported once per
Emacs session, and tried again only when a command needs it."
  (when (or (null conn) (eq conn dovecote--starting))
    (setq dovecote--starting nil
          dovecote--connecting nil
          dovecote--start-failure why)
    (when conn
      (let ((dovecote--shutting-down t))
        (ignore-errors (jsonrpc-shutdown conn t))))
    (cond
     (dovecote--was-connected
      (setq dovecote--reconnect-wait
            (min 60 (* 2 (or dovecote--reconnect-wait dovecote-reconnect-delay))))
      (message "dovecote: cannot restart the server (%s); retrying in %gs"
               why dovecote--reconnect-wait)
      (dovecote--schedule-reconnect))
     ((not dovecote--failure-reported)
      (setq dovecote--failure-reported t)
      (message "dovecote: cannot start the server: %s (see \
`dovecote-server-command'); the next dovecote command tries again" why)))
    (force-mode-line-update t)))

(defun dovecote--stderr (conn)
  "Return the end of what the server of CONN wrote to its stderr, or \"\"."
  (let ((buffer (ignore-errors (jsonrpc-stderr-buffer conn))))
    (if (not (buffer-live-p buffer))
        ""
      (with-current-buffer buffer
        (let ((text (string-trim (buffer-substring-no-properties
                                  (max (point-min) (- (point-max) 400))
                                  (point-max)))))
          (if (string-empty-p text) "" (concat "\n" text)))))))

(defun dovecote--on-shutdown (conn)
  "Forget CONN, whose server process died; restart it unless on purpose."
  (when (eq conn dovecote--connection)
    (setq dovecote--connection nil)
    (dolist (buffer (dovecote--buffers))
      (with-current-buffer buffer
        (setq dovecote--opened nil)))
    (unless dovecote--shutting-down
      (dovecote--schedule-reconnect))
    (force-mode-line-update t)))

(defun dovecote--schedule-reconnect ()
  "Restart the server soon, if it ran before and a buffer or call needs it."
  (when (and dovecote--was-connected
             (not dovecote--shutting-down)
             (not dovecote--connecting)
             (not dovecote--reconnect-timer)
             (not (dovecote--live))
             (or (dovecote--buffers)
                 (> (hash-table-count dovecote--commands) 0)
                 (> (hash-table-count dovecote--flows) 0)))
    (setq dovecote--reconnect-timer
          (run-at-time (or dovecote--reconnect-wait dovecote-reconnect-delay)
                       nil #'dovecote--reconnect))))

(defun dovecote--reconnect ()
  "Restart the server from a timer; on failure try again later."
  (setq dovecote--reconnect-timer nil)
  (unless dovecote--shutting-down
    (dovecote--start)))

(defun dovecote--watch (conn)
  "Watch this Emacs' pending commands and flows on CONN; refresh their states.
The flows were started on an earlier connection: CONN's server does
not send their `flow/state', so they are asked about (see
`dovecote--poll-interval') until they are over."
  (dolist (id (hash-table-keys dovecote--flows))
    (dovecote--ask-flow conn id t))
  (dovecote--schedule-poll)
  (let ((ids (hash-table-keys dovecote--commands)))
    (when ids
      (jsonrpc-async-request
       conn 'command/watch (list :commandIds (vconcat ids))
       :success-fn (lambda (_result) (dovecote--refresh-states conn ids))
       :error-fn (lambda (err)
                   (message "dovecote: command/watch failed: %s"
                            (plist-get err :message))
                   (dovecote--refresh-states conn ids))
       :timeout-fn #'ignore))))

(defun dovecote--refresh-states (conn ids)
  "Ask CONN for the state of the commands IDS, which may have moved unseen."
  (dolist (id ids)
    (jsonrpc-async-request
     conn 'command/show (list :commandId id)
     :success-fn
     (lambda (result)
       (let ((command (plist-get result :command)))
         (when (gethash id dovecote--commands)
           (dovecote--on-state
            (list :commandId id
                  :state (plist-get command :state)
                  :reason (plist-get command :reason))))))
     :error-fn (lambda (_err)
                 ;; The server does not know it: nothing will ever finish it.
                 (when (gethash id dovecote--commands)
                   (dovecote--on-state (list :commandId id :state "dead"
                                             :reason "unknown"))))
     :timeout-fn #'ignore)))

(defun dovecote-shutdown ()
  "Stop the dovecote server and turn off `dovecote-mode' everywhere.
Calls still pending go on in the server's database; the next start of
the server picks them up."
  (interactive)
  (let ((dovecote--shutting-down t))
    (when dovecote--reconnect-timer
      (cancel-timer dovecote--reconnect-timer)
      (setq dovecote--reconnect-timer nil))
    (when dovecote--poll-timer
      (cancel-timer dovecote--poll-timer)
      (setq dovecote--poll-timer nil))
    (dolist (buffer (dovecote--buffers))
      (with-current-buffer buffer (dovecote-mode -1)))
    (dolist (table (list dovecote--commands dovecote--flows))
      (maphash (lambda (_id info)
                 (when-let ((overlay (plist-get info :overlay)))
                   (delete-overlay overlay)))
               table))
    (when-let ((conn dovecote--starting))
      (setq dovecote--starting nil)
      (ignore-errors (jsonrpc-shutdown conn t)))
    (setq dovecote--connecting nil
          dovecote--was-connected nil
          dovecote--failure-reported nil
          dovecote--start-failure nil
          dovecote--server-root nil)
    (when-let ((conn dovecote--connection))
      (setq dovecote--connection nil)
      (let ((process (jsonrpc--process conn))
            (deadline (+ (float-time) 2)))
        (when (process-live-p process)
          (ignore-errors (process-send-eof process))
          (while (and (process-live-p process) (< (float-time) deadline))
            (accept-process-output process 0.05)))
        (ignore-errors (jsonrpc-shutdown conn t))))
    (clrhash dovecote--commands)
    (clrhash dovecote--unclaimed)
    (clrhash dovecote--flows)
    (clrhash dovecote--step-commands)
    (clrhash dovecote--unclaimed-flows)
    (setq dovecote--expected 0
          dovecote--reconnect-wait nil)
    (force-mode-line-update t)))

;;;; Documents

(defun dovecote--buffers ()
  "Return the live buffers in `dovecote-mode'."
  (cl-remove-if-not (lambda (buffer) (buffer-local-value 'dovecote-mode buffer))
                    (buffer-list)))

(defun dovecote--buffer-uri ()
  "Return the document URI for the current buffer."
  (if buffer-file-name
      (concat "file://" (expand-file-name buffer-file-name))
    (concat "buffer://" (buffer-name))))

(defun dovecote--buffer-of (uri)
  "Return the buffer in `dovecote-mode' whose document is URI, or nil."
  (cl-find uri (dovecote--buffers)
           :key (lambda (buffer) (buffer-local-value 'dovecote--uri buffer))
           :test #'equal))

(defun dovecote--open (conn)
  "Open the current buffer's document on CONN with its whole text."
  (save-restriction
    (widen)
    (setq dovecote--size (buffer-size)
          dovecote--opened nil)
    (condition-case err
        (progn
          (jsonrpc-notify conn 'document/open
                          (list :uri dovecote--uri
                                :version dovecote--version
                                :text (buffer-substring-no-properties
                                       (point-min) (point-max))))
          (setq dovecote--opened conn))
      (error (message "dovecote: cannot open %s: %s"
                      dovecote--uri (error-message-string err))))))

(defun dovecote--opened-p ()
  "Return non-nil if the current buffer is open on the live connection."
  (and dovecote--opened
       (eq dovecote--opened dovecote--connection)
       (jsonrpc-running-p dovecote--opened)))

(defvar dovecote--applying nil
  "Non-nil while an edit of the server is applied: it reports its own change.")

(defun dovecote--after-change (beg end old-len)
  "Report the change of BEG..END, which replaced OLD-LEN characters.
Offsets are code points from the start of the whole buffer."
  (when (and dovecote--uri (not dovecote--applying))
    (dovecote--report
     (if (= (buffer-size) (+ dovecote--size (- end beg) (- old-len)))
         (list :start (1- beg) :end (+ (1- beg) old-len)
               :text (buffer-substring-no-properties beg end))
       ;; The hook's arguments do not add up: send the whole text.
       (save-restriction
         (widen)
         (list :start 0 :end dovecote--size
               :text (buffer-substring-no-properties
                      (point-min) (point-max))))))))

(defun dovecote--report (change)
  "Send CHANGE, a plist with `:start', `:end' and `:text', to the server."
  (cl-incf dovecote--version)
  (setq dovecote--size (buffer-size))
  ;; Sent at once, even while a call about this buffer is being asked
  ;; for: the server takes a call's snapshot before it reads the next
  ;; message, so the change lands after the snapshot.
  (if (dovecote--opened-p)
      (condition-case nil
          (jsonrpc-notify dovecote--opened 'document/change
                          (list :uri dovecote--uri
                                :version dovecote--version
                                :changes (vector change)))
        (error (setq dovecote--opened nil)
               (dovecote--schedule-reconnect)))
    ;; Disconnected: the next connection opens the whole text.
    (setq dovecote--opened nil)
    (dovecote--schedule-reconnect)))

(defun dovecote--close ()
  "Close the current buffer's document on the server."
  (when (and dovecote--uri (dovecote--opened-p))
    (ignore-errors
      (jsonrpc-notify dovecote--opened 'document/close
                      (list :uri dovecote--uri))))
  (setq dovecote--opened nil))

(defun dovecote--save ()
  "Tell the server the current buffer was saved.
What its corrected regions hold now is what the person kept."
  (when (and dovecote--uri (dovecote--opened-p))
    (ignore-errors
      (jsonrpc-notify dovecote--opened 'document/save
                      (list :uri dovecote--uri :version dovecote--version)))))

(defun dovecote--replace (start end text)
  "Replace the text from START to END with TEXT, moving markers sensibly.
The server hears of it as one replacement, not as an insertion and a
deletion: a replacement of a region's own text stays inside every
live region that it touches (so a second call on the same words sees
the first call's fix as part of them, not as new text beside them)."
  (save-excursion
    (let ((dovecote--applying t))
      (goto-char start)
      (insert text)
      (delete-region (point) (+ (point) (- end start)))))
  (dovecote--report (list :start (1- start) :end (1- end) :text text)))

(defun dovecote--apply-edits (edits)
  "Apply the `document/applyEdit' EDITS (a vector) as one undo unit.
The unit is the model's alone: a boundary before it, one after it,
and the amalgamation of the next `self-insert-command' with what
came before is stopped, so one \\[undo] takes back exactly this edit,
never the person's typing around it."
  (undo-boundary)
  (cl-loop for edit across edits
           do (dovecote--replace (1+ (plist-get edit :start))
                                 (1+ (plist-get edit :end))
                                 (plist-get edit :text)))
  (undo-boundary)
  ;; `undo-auto-amalgamate' removes the boundary at the head of the
  ;; undo list when the last command amalgamated (typing); this says the
  ;; last boundary was not a command's.
  (setq undo-auto--last-boundary-cause nil)
  (when (and (not (bound-and-true-p smerge-mode))
             (cl-some (lambda (edit)
                        (string-search "<<<<<<<" (plist-get edit :text)))
                      edits)
             (save-excursion
               (goto-char (point-min))
               (re-search-forward "^<<<<<<< yours$" nil t)))
    (smerge-mode 1)
    (message "dovecote: conflict markers written; %s keeps a side"
             (substitute-command-keys
              "\\<smerge-mode-map>\\[smerge-keep-upper] or \\[smerge-keep-lower]"))))

(defun dovecote--apply-edit (params)
  "Apply the `document/applyEdit' PARAMS if the version matches.
Return the JSON-RPC result: applied true, or false when the buffer has
moved on (or is gone) and the server must merge again."
  (let* ((buffer (dovecote--buffer-of (plist-get params :uri)))
         (edits (plist-get params :edits))
         (applied
          (and buffer
               (with-current-buffer buffer
                 (and (dovecote--opened-p)
                      (eql (plist-get params :version) dovecote--version)
                      (vectorp edits)
                      (save-restriction
                        (widen)
                        (and (cl-every
                              (lambda (edit)
                                (let ((start (plist-get edit :start))
                                      (end (plist-get edit :end)))
                                  (and (natnump start) (natnump end)
                                       (<= start end (buffer-size))
                                       (stringp (plist-get edit :text)))))
                              edits)
                             (condition-case err
                                 (progn (dovecote--apply-edits edits) t)
                               (error
                                (message "dovecote: cannot apply an edit: %s"
                                         (error-message-string err))
                                nil)))))))))
    (list :applied (if applied t :json-false))))

;;;; Dispatch

(defun dovecote--handle-request (_conn method params)
  "Answer the server's request METHOD with PARAMS."
  (pcase method
    ('document/applyEdit (dovecote--apply-edit params))
    (_ (jsonrpc-error :code -32601
                      :message (format "dovecote.el has no method %s" method)))))

(defun dovecote--handle-notification (_conn method params)
  "Handle the server's notification METHOD with PARAMS."
  (pcase method
    ('command/state (dovecote--on-state params))
    ('command/progress (dovecote--on-progress params))
    ('flow/state (dovecote--on-flow-state params))
    ('human/ask (run-at-time 0 nil #'dovecote--on-human-ask params))
    ('server/error (dovecote--on-server-error params))
    (_ nil)))

(defun dovecote--on-server-error (params)
  "Report the refused notification in PARAMS; re-sync documents if needed."
  (message "dovecote: the server refused %s: %s"
           (plist-get params :method) (plist-get params :message))
  (when (member (plist-get params :method)
                '("document/change" "document/open"))
    ;; The server's copy is wrong; which document is not said: re-open all.
    (when-let ((conn (dovecote--live)))
      (dolist (buffer (dovecote--buffers))
        (with-current-buffer buffer
          (cl-incf dovecote--version)
          (dovecote--open conn))))))

;;;; Calls

(defun dovecote--flow-stalled-p (info)
  "Return non-nil if the correction INFO describes waits for a decision.
That is when its step's command is dead (a dead letter to replay), or
its flow is stalled on a command not known here."
  (let ((command-state (plist-get info :command-state)))
    (or (equal command-state "dead")
        (and (null command-state)
             (equal (plist-get info :state) "stalled")))))

(defun dovecote-pending-count ()
  "Return the number of pending LLM jobs of this Emacs.
A plain call (`dovecote-submit') counts until it is in a terminal
state.  A correction (`dovecote-correct-region') counts from the
moment it is asked for until its flow is completed, failed or
cancelled, except while it is stalled: its step's call died, and it
waits for a decision, the dead letter being listed by
`dovecote-list-dead-letters'.  Once the dead letter is replayed, the
correction counts again."
  (let ((flows 0))
    (maphash (lambda (_id info)
               (unless (dovecote--flow-stalled-p info) (cl-incf flows)))
             dovecote--flows)
    (+ dovecote--expected (hash-table-count dovecote--commands) flows)))

(defun dovecote--stalled-count ()
  "Return the number of this Emacs' corrections stalled on a dead call."
  (let ((stalled 0))
    (maphash (lambda (_id info)
               (when (dovecote--flow-stalled-p info) (cl-incf stalled)))
             dovecote--flows)
    stalled))

(defun dovecote--mode-line ()
  "Return the `dovecote-mode' lighter: a count, `!' offline.
The number counts every call still highlighted in a buffer: the
pending ones and the stalled ones, which wait for a decision."
  (let ((shown (+ (dovecote-pending-count) (dovecote--stalled-count))))
    (concat " Dove"
            (if (> shown 0) (format ":%d" shown) "")
            (if (dovecote--live) "" "!"))))

(defun dovecote--short-id (id)
  "Return the short form of the call ID: its last 8 characters.
Ids are UUIDv7, whose first characters are the time: those of calls
made together are alike, their ends differ."
  (if (and (stringp id) (> (length id) 8)) (substring id -8) (or id "")))

(defun dovecote--history-put (id &rest pairs)
  "Set the PAIRS (keys and values) in the history entry of the call ID."
  (let ((entry (gethash id dovecote--history)))
    (while pairs
      (setq entry (plist-put entry (pop pairs) (pop pairs))))
    (puthash id entry dovecote--history)
    (dovecote--refresh-calls-soon)))

(defun dovecote--first-line (text)
  "Return the first non-empty line of TEXT, or \"\"."
  (or (cl-find-if-not #'string-empty-p
                      (split-string (or text "") "\n"))
      ""))

(defun dovecote--expect (count)
  "Count COUNT more commands or flows whose ids are still to come back."
  (setq dovecote--expected (max 0 (+ dovecote--expected count)))
  (when (zerop dovecote--expected)
    (clrhash dovecote--unclaimed)
    (clrhash dovecote--unclaimed-flows)
    (dovecote--forget-steps))
  (force-mode-line-update t))

(defun dovecote--claim (id info)
  "Make the call ID one of ours, with INFO (a plist, see `dovecote--commands')."
  (let ((early (gethash id dovecote--unclaimed)))
    (remhash id dovecote--unclaimed)
    (puthash id (plist-put info :state "pending") dovecote--commands)
    (when-let ((overlay (plist-get info :overlay)))
      (overlay-put overlay 'dovecote-id id)
      (overlay-put overlay 'dovecote-kind 'command))
    (dovecote--history-put
     id :kind 'command :state "pending"
     :created (or (plist-get info :created) (float-time))
     :adapter (plist-get info :adapter)
     :buffer (let ((buffer (plist-get info :buffer)))
               (if (buffer-live-p buffer) (buffer-name buffer) ""))
     :text (plist-get info :text))
    (when early (dovecote--on-state early))
    (force-mode-line-update t)))

(defun dovecote--on-state (params)
  "Record the `command/state' PARAMS of a call."
  (let* ((id (plist-get params :commandId))
         (state (plist-get params :state))
         (info (gethash id dovecote--commands))
         (flow-id (plist-get params :flowId)))
    (cond
     ((and (null info) flow-id)
      (dovecote--on-step-state flow-id params))
     ((null info)
      (when (> dovecote--expected 0)
        (puthash id params dovecote--unclaimed)))
     ((member state '("done" "dead" "cancelled"))
      (remhash id dovecote--commands)
      (dovecote--history-put id :state state)
      (force-mode-line-update t)
      (dovecote--finished id info state params))
     (t (puthash id (plist-put info :state state) dovecote--commands)
        (dovecote--history-put id :state state)))))

(defun dovecote--finished (id info state params)
  "Wind up the call ID (with INFO), now in terminal STATE (from PARAMS)."
  (when-let ((overlay (plist-get info :overlay)))
    (delete-overlay overlay))
  (pcase state
    ("done" (message "dovecote: call %s is done" (dovecote--short-id id)))
    ("dead"
     (message "dovecote: call %s is dead (%s); %s replays it"
              (dovecote--short-id id)
              (or (plist-get params :reason) "?")
              (substitute-command-keys "\\[dovecote-list-dead-letters]"))
     (dovecote--refresh-dead-letters-soon))
    ("cancelled" (message "dovecote: call %s was cancelled"
                          (dovecote--short-id id))))
  (dovecote--show-result id state (plist-get info :buffer)
                         (plist-get info :callback))
  (run-hook-with-args 'dovecote-finished-functions id state))

(defun dovecote--show-result (id state buffer callback)
  "Fetch the result of the call ID, over in STATE, about BUFFER.
Open its kept conflicts, if any, and call CALLBACK, if non-nil, with
the `command/show' result."
  (when-let ((conn (and (or callback (equal state "done")) (dovecote--live)))
             ;; Its history entry: the correction's, if a step's.
             (key (or (gethash id dovecote--step-commands) id)))
    (jsonrpc-async-request
     conn 'command/show (list :commandId id)
     :success-fn
     (lambda (result)
       (let ((unresolved (plist-get result :unresolved)))
         (when (and (equal state "done") (numberp unresolved) (> unresolved 0))
           (dovecote--history-put key :conflicts id)
           (dovecote--show-conflicts id buffer result)))
       (when callback (funcall callback result)))
     :error-fn #'ignore
     :timeout-fn #'ignore)))

(cl-defun dovecote-submit (adapter request &key buffer start end on-conflict
                                   timeout max-attempts callback)
  "Ask ADAPTER for REQUEST and return at once.
REQUEST is a plist as on the wire: `:messages' (a vector of plists with
`:role' and `:content'), and maybe `:system', `:maxTokens',
`:temperature'.  With BUFFER, START and END the reply replaces that
region (positions in BUFFER) through the three-way merge, colliding
edits handled by ON-CONFLICT (see `dovecote-on-conflict'); REQUEST
may then be a function, called with the region's text when the call
is sent, that returns the plist.  TIMEOUT defaults to
`dovecote-default-timeout'; MAX-ATTEMPTS to the server's.  CALLBACK,
if non-nil, is called with the `command/show' result once the call is
over."
  (let* ((conn (dovecote--ensure))
         (timeout (or timeout dovecote-default-timeout))
         (options (append (and timeout (list :timeout timeout))
                          (and max-attempts (list :maxAttempts max-attempts))))
         (info (list :buffer buffer :callback callback :adapter adapter
                     :created (float-time)
                     :text (and (not (functionp request))
                                (dovecote--prompt-line
                                 (list :request request))))))
    (if (not buffer)
        (progn
          (dovecote--expect 1)
          (dovecote--send conn (append (list :adapter adapter :request request)
                                       options)
                          info))
      (with-current-buffer buffer
        (unless dovecote-mode (dovecote-mode 1))
        (unless (dovecote--opened-p) (dovecote--open conn))
        (let ((overlay (make-overlay start end nil t nil))
              (on-conflict (or on-conflict dovecote-on-conflict)))
          (overlay-put overlay 'face 'dovecote-pending)
          (overlay-put overlay 'help-echo "dovecote: call pending")
          (setq info (plist-put info :overlay overlay))
          (unless (plist-get info :text)
            (setq info (plist-put info :text (dovecote--first-line
                                              (buffer-substring-no-properties
                                               start end)))))
          (dovecote--expect 1)
          ;; What is typed from now on is sent at once: the server takes
          ;; the region's snapshot before it reads that change.
          (dovecote--send
           conn
           (append (list :adapter adapter
                         :request (if (functionp request)
                                      (funcall request
                                               (buffer-substring-no-properties
                                                start end))
                                    request)
                         :target (list :uri dovecote--uri
                                       :start (1- start)
                                       :end (1- end))
                         :onConflict on-conflict)
                   options)
           info))))
    nil))

(defun dovecote--send (conn params info)
  "Send the `command/submit' PARAMS on CONN for the call INFO describes."
  (let ((overlay (plist-get info :overlay))
        (done nil))
    (cl-flet ((release ()
                       (unless done
                         (setq done t)
                         (dovecote--expect -1)))
              (failed (why)
                      (when overlay (delete-overlay overlay))
                      (message "dovecote: the call may not have been made: %s" why)))
      (condition-case err
          (jsonrpc-async-request
           conn 'command/submit params
           :success-fn
           (lambda (result)
             (dovecote--claim (plist-get result :commandId) info)
             (release))
           :error-fn (lambda (err) (release) (failed (plist-get err :message)))
           :timeout-fn (lambda () (release) (failed "no answer from the server")))
        (error (release) (failed (error-message-string err)))))))

;;;; Progress and cancelling

(defun dovecote--overlay-of (id)
  "Return the highlight of the pending call ID (or of its correction), or nil."
  (plist-get (or (gethash id dovecote--commands)
                 (gethash (gethash id dovecote--step-commands) dovecote--flows))
             :overlay))

(defun dovecote--on-progress (params)
  "Show the streamed reply in the `command/progress' PARAMS at its region."
  (let ((overlay (dovecote--overlay-of (plist-get params :commandId)))
        (text (plist-get params :text)))
    (when (and (overlayp overlay) (overlay-buffer overlay) (stringp text))
      (let* ((line (car (last (split-string (string-trim-right text) "\n"))))
             (tail (if (> (length line) 40) (concat "…" (substring line -40)) line)))
        (overlay-put overlay 'after-string
                     (propertize (concat " ⟶ " tail) 'face 'dovecote-progress))
        (overlay-put overlay 'help-echo (concat "dovecote: the reply so far:\n" text))))))

(defun dovecote--calls-in (buffer &optional start end)
  "Return (ID . KIND) of each pending call highlighted in BUFFER.
With START and END, only those whose region meets START..END."
  (with-current-buffer buffer
    (let (calls)
      (dolist (overlay (if start
                           (overlays-in start (min (point-max) (max end (1+ start))))
                         (overlays-in (point-min) (point-max))))
        (when-let ((id (overlay-get overlay 'dovecote-id)))
          (cl-pushnew (cons id (overlay-get overlay 'dovecote-kind)) calls
                      :test #'equal)))
      calls)))

(defun dovecote--cancel-id (id kind)
  "Ask the server to cancel the call ID, a correction if KIND is `flow'."
  (jsonrpc-async-request
   (dovecote--ensure)
   (if (eq kind 'flow) 'flow/cancel 'command/cancel)
   (if (eq kind 'flow) (list :flowId id) (list :commandId id))
   :success-fn #'ignore
   :error-fn (lambda (err)
               (message "dovecote: cannot cancel %s: %s" (dovecote--short-id id)
                        (plist-get err :message)))
   :timeout-fn #'ignore))

;;;###autoload
(defun dovecote-cancel (&optional all)
  "Cancel the pending call or correction at point.
With a prefix argument ALL, cancel every one in this buffer.  Your
text stays as it is; the highlight goes when the server says so.
Return the ids asked to cancel."
  (interactive "P")
  (let ((calls (if all
                   (dovecote--calls-in (current-buffer))
                 (dovecote--calls-in (current-buffer) (point) (point)))))
    (unless calls
      (user-error (if all "No pending call in this buffer"
                    "No pending call at point")))
    (pcase-dolist (`(,id . ,kind) calls)
      (dovecote--cancel-id id kind))
    (message "dovecote: cancelling %d call%s" (length calls)
             (if (= (length calls) 1) "" "s"))
    (mapcar #'car calls)))

;;;; Corrections: the server's "corrections" flow

(defun dovecote--flow-put (id &rest pairs)
  "Set the PAIRS (keys and values) in the plist of the flow ID, if ours."
  (when-let ((info (gethash id dovecote--flows)))
    (while pairs
      (setq info (plist-put info (pop pairs) (pop pairs))))
    (puthash id info dovecote--flows)
    (let ((stalled (dovecote--flow-stalled-p info)))
      (when-let ((overlay (plist-get info :overlay)))
        (overlay-put overlay 'face
                     (if stalled 'dovecote-stalled 'dovecote-pending))
        (overlay-put overlay 'help-echo
                     (if stalled
                         "dovecote: correction stalled, its call died: \
replay it from `dovecote-list-dead-letters' or `dovecote-cancel' it"
                       "dovecote: correction pending")))
      (dovecote--history-put id :state (if stalled "stalled"
                                         (plist-get info :state))
                             :command (plist-get info :command)))))

(defun dovecote--heard-p (info)
  "Return non-nil if the live connection reports the flow INFO describes."
  (let ((conn (plist-get info :conn)))
    (and conn (eq conn (dovecote--live)))))

(defun dovecote--start-correction (buffer start end)
  "Start the \"corrections\" flow on the region START..END of BUFFER."
  (let ((conn (dovecote--ensure)))
    (with-current-buffer buffer
      (unless (dovecote--opened-p) (dovecote--open conn))
      (let* ((overlay (make-overlay start end nil t nil))
             (info (list :state "running" :command nil :command-state nil
                         :buffer buffer :overlay overlay :conn conn
                         :asking nil :created (float-time)
                         :text (dovecote--first-line
                                (buffer-substring-no-properties start end))))
             (params (append (list :instruction dovecote-correction-instruction
                                   :adapter dovecote-adapter)
                             (and dovecote-default-timeout
                                  (list :timeout dovecote-default-timeout))))
             (done nil))
        (overlay-put overlay 'face 'dovecote-pending)
        (overlay-put overlay 'help-echo "dovecote: correction pending")
        (dovecote--expect 1)
        (cl-flet ((release ()
                           (unless done
                             (setq done t)
                             (dovecote--expect -1)))
                  (failed (why)
                          (delete-overlay overlay)
                          (message "dovecote: the correction may not have \
been asked for: %s" why)))
          (condition-case err
              ;; What is typed from now on is sent at once: the server
              ;; takes the region's snapshot before it reads that change.
              (jsonrpc-async-request
               conn 'flow/start
               (list :flow "corrections"
                     :params params
                     :target (list :uri dovecote--uri
                                   :start (1- start)
                                   :end (1- end)
                                   :version dovecote--version)
                     :onConflict dovecote-on-conflict)
               :success-fn
               (lambda (result)
                 (dovecote--claim-flow (plist-get result :flowId) info)
                 (release))
               :error-fn (lambda (err) (release) (failed (plist-get err :message)))
               :timeout-fn (lambda () (release) (failed "no answer from the server")))
            (error (release) (failed (error-message-string err)))))))))

(defun dovecote--claim-flow (id info)
  "Make the flow ID one of our corrections, with INFO.
Replay the notifications about it that overtook the response."
  (let ((early (reverse (gethash id dovecote--unclaimed-flows))))
    (remhash id dovecote--unclaimed-flows)
    (puthash id info dovecote--flows)
    (when-let ((overlay (plist-get info :overlay)))
      (overlay-put overlay 'dovecote-id id)
      (overlay-put overlay 'dovecote-kind 'flow))
    (dovecote--history-put
     id :kind 'flow :state (plist-get info :state)
     :created (plist-get info :created) :adapter dovecote-adapter
     :buffer (let ((buffer (plist-get info :buffer)))
               (if (buffer-live-p buffer) (buffer-name buffer) ""))
     :text (plist-get info :text))
    (pcase-dolist (`(,method . ,params) early)
      (pcase method
        ('flow/state (dovecote--on-flow-state params))
        ('command/state (dovecote--on-step-state id params))))
    (force-mode-line-update t)))

(defun dovecote--on-flow-state (params)
  "Record the `flow/state' PARAMS of a correction."
  (let* ((id (plist-get params :flowId))
         (state (plist-get params :state))
         (info (gethash id dovecote--flows)))
    (cond
     ((null info)
      (when (> dovecote--expected 0)
        (push (cons 'flow/state params)
              (gethash id dovecote--unclaimed-flows))))
     ((member state '("completed" "failed" "cancelled"))
      (remhash id dovecote--flows)
      (dovecote--history-put id :state state)
      (dovecote--flow-finished id info state))
     (t
      (when (and (equal (plist-get info :state) "stalled")
                 (member state '("waiting" "running"))
                 (equal (plist-get info :command-state) "dead"))
        ;; The dead step was taken over by a replay asked elsewhere.
        (dovecote--flow-put id :command-state nil))
      (dovecote--flow-put id :state state)))
    (force-mode-line-update t)))

(defun dovecote--on-step-state (flow-id params)
  "Record the `command/state' PARAMS of a step command of the flow FLOW-ID.
The server sends them to every connection that has the document open:
those of flows not ours are ignored."
  (let* ((id (plist-get params :commandId))
         (state (plist-get params :state))
         (info (gethash flow-id dovecote--flows))
         (terminal '("done" "dead" "cancelled")))
    (cond
     ((null info)
      (when (> dovecote--expected 0)
        ;; Maybe ours, its flow/start (or replay) not answered yet.
        (puthash id params dovecote--unclaimed)
        (push (cons 'command/state params)
              (gethash flow-id dovecote--unclaimed-flows))))
     ((and (equal id (plist-get info :command))
           (or (equal state (plist-get info :command-state))
               ;; Terminal states are final; an older report is stale.
               (member (plist-get info :command-state) terminal))))
     (t
      (puthash id flow-id dovecote--step-commands)
      (dovecote--flow-put flow-id :command id :command-state state)
      (force-mode-line-update t)
      (when (member state terminal)
        (dovecote--step-finished (gethash flow-id dovecote--flows)
                                 id state params))))))

(defun dovecote--step-finished (info id state params)
  "Wind up the step command ID of the correction INFO describes.
The command is now in terminal STATE (from PARAMS)."
  (pcase state
    ("dead"
     (message "dovecote: a correction is stalled: its call %s is dead (%s); \
%s replays it" (dovecote--short-id id) (or (plist-get params :reason) "?")
              (substitute-command-keys "\\[dovecote-list-dead-letters]"))
     (dovecote--refresh-dead-letters-soon))
    ("cancelled" (message "dovecote: call %s was cancelled"
                          (dovecote--short-id id))))
  (dovecote--show-result id state (plist-get info :buffer) nil)
  (run-hook-with-args 'dovecote-finished-functions id state)
  (unless (dovecote--heard-p info)
    ;; No flow/state will say the flow is over: ask soon.
    (dovecote--schedule-poll 0.05)))

(defun dovecote--flow-finished (id info state)
  "Wind up the correction of the flow ID (with INFO), now in terminal STATE."
  (when-let ((overlay (plist-get info :overlay)))
    (delete-overlay overlay))
  (unless (> dovecote--expected 0)
    (dovecote--forget-steps))
  (pcase state
    ("completed"
     (let ((buffer (plist-get info :buffer))
           (pending (dovecote-pending-count)))
       (message "dovecote: correction landed in %s%s"
                (if (buffer-live-p buffer) (buffer-name buffer) "a closed buffer")
                (if (> pending 0) (format " (%d pending)" pending) ""))))
    ("cancelled" (message "dovecote: correction %s was cancelled"
                          (dovecote--short-id id)))
    ("failed"
     (if-let ((conn (dovecote--live)))
         (jsonrpc-async-request
          conn 'flow/show (list :flowId id)
          :success-fn (lambda (result)
                        (message "dovecote: correction %s failed: %s"
                                 (dovecote--short-id id)
                                 (or (plist-get result :error) "?")))
          :error-fn (lambda (_err)
                      (message "dovecote: correction %s failed"
                               (dovecote--short-id id)))
          :timeout-fn #'ignore)
       (message "dovecote: correction %s failed" (dovecote--short-id id))))))

(defun dovecote--forget-steps ()
  "Forget the step commands of flows no longer ours."
  (dolist (id (hash-table-keys dovecote--step-commands))
    (unless (gethash (gethash id dovecote--step-commands) dovecote--flows)
      (remhash id dovecote--step-commands))))

(defun dovecote--ask-flow (conn id &optional watch)
  "Ask CONN for the state of the flow ID and record it.
With WATCH, also watch its step's command, to hear of it even without
the document open."
  (let ((info (gethash id dovecote--flows)))
    (when (and info (not (eq (plist-get info :asking) conn)))
      (dovecote--flow-put id :asking conn)
      (jsonrpc-async-request
       conn 'flow/show (list :flowId id)
       :success-fn
       (lambda (result)
         (dovecote--flow-put id :asking nil)
         (dovecote--sync-flow id result)
         (let ((info (gethash id dovecote--flows)))
           (when (and watch info (plist-get info :command)
                      (not (member (plist-get info :command-state)
                                   '("done" "dead" "cancelled")))
                      (eq conn (dovecote--live)))
             (jsonrpc-async-request
              conn 'command/watch
              (list :commandIds (vector (plist-get info :command)))
              :success-fn #'ignore :error-fn #'ignore :timeout-fn #'ignore))))
       :error-fn
       (lambda (err)
         (dovecote--flow-put id :asking nil)
         (when (and (eql (plist-get err :code) -32007) ; Unknown flow.
                    (gethash id dovecote--flows))
           ;; The server does not know it: nothing will ever finish it.
           (let ((info (gethash id dovecote--flows)))
             (remhash id dovecote--flows)
             (dovecote--flow-finished id info "failed"))))
       :timeout-fn (lambda () (dovecote--flow-put id :asking nil))))))

(defun dovecote--sync-flow (id result)
  "Record the state of the flow ID from its `flow/show' RESULT."
  (when (gethash id dovecote--flows)
    (let ((step (car (last (cl-remove-if-not
                            (lambda (step) (plist-get step :commandId))
                            (append (plist-get result :steps) nil))))))
      (when (and step (stringp (plist-get step :state)))
        (dovecote--on-step-state
         id (list :commandId (plist-get step :commandId)
                  :state (plist-get step :state)
                  :flowId id))))
    (let ((info (gethash id dovecote--flows))
          (state (plist-get result :state)))
      (when (and info (stringp state)
                 (not (equal state (plist-get info :state))))
        (dovecote--on-flow-state (list :flowId id :state state
                                       :step (plist-get result :step)))))))

(defun dovecote--unheard-flows ()
  "Return the ids of our flows whose `flow/state' the server does not send."
  (let (ids)
    (maphash (lambda (id info) (unless (dovecote--heard-p info) (push id ids)))
             dovecote--flows)
    ids))

(defun dovecote--schedule-poll (&optional delay)
  "Ask about the unheard flows in DELAY seconds, or `dovecote--poll-interval'.
A poll already due later is brought forward."
  (let ((delay (or delay dovecote--poll-interval)))
    (when (and dovecote--poll-timer
               (< (+ (float-time) delay) dovecote--poll-due))
      (cancel-timer dovecote--poll-timer)
      (setq dovecote--poll-timer nil))
    (when (and (not dovecote--poll-timer)
               (dovecote--live)
               (dovecote--unheard-flows))
      (setq dovecote--poll-due (+ (float-time) delay)
            dovecote--poll-timer (run-at-time delay nil #'dovecote--poll)))))

(defun dovecote--poll ()
  "Ask the server about the flows it does not report; again later."
  (setq dovecote--poll-timer nil)
  (when-let ((conn (dovecote--live)))
    (dolist (id (dovecote--unheard-flows))
      (dovecote--ask-flow conn id)))
  (dovecote--schedule-poll))

(defun dovecote--clip (start end)
  "Return (START . END) clipped to the accessible part of the buffer."
  (cons (max start (point-min)) (min end (point-max))))

;;;###autoload
(defun dovecote-correct-region (&optional start end)
  "Ask for corrections of the region from START to END; return at once.
Interactively, and when START is nil, that is the active region, or
else the paragraph at point (never a region left inactive).
This starts the server's \"corrections\" flow on the region: its text
goes unchanged as the one user message, with
`dovecote-correction-instruction' as the system prompt, to
`dovecote-adapter', with the timeout `dovecote-default-timeout'.  Keep
typing: the reply is merged into the region as it is when the reply
arrives, colliding edits handled as `dovecote-on-conflict' says.  If
the call dies, the correction stalls until its dead letter is
replayed (see `dovecote-list-dead-letters') or cancelled
\(`dovecote-cancel')."
  (interactive)
  (unless start
    (pcase-setq `(,start . ,end) (dovecote--region-or-paragraph)))
  (pcase-let ((`(,start . ,end) (dovecote--clip (min start end)
                                                (max start end))))
    (when (= start end)
      (user-error "The region is empty"))
    (unless dovecote-mode (dovecote-mode 1))
    (dovecote--start-correction (current-buffer) start end)
    (when (called-interactively-p 'any)
      (deactivate-mark)
      (message "dovecote: correction asked (%d pending)"
               (dovecote-pending-count)))))

(defun dovecote--region-or-paragraph ()
  "Return (START . END) of the active region, else of the paragraph at point."
  (if (use-region-p)
      (cons (region-beginning) (region-end))
    (save-excursion
      (let* ((end (progn (forward-paragraph)
                         (skip-chars-backward " \t\n")
                         (point)))
             (start (progn (backward-paragraph)
                           (skip-chars-forward " \t\n")
                           (point))))
        (if (< start end)
            (cons start end)
          (user-error "No paragraph at point"))))))

;;;; The minor mode

(defun dovecote--before-major-mode-change ()
  "Turn `dovecote-mode' off before the major mode wipes its variables."
  (dovecote-mode -1))

(defvar dovecote-command-map
  (let ((map (make-sparse-keymap)))
    (define-key map "c" #'dovecote-correct-region)
    (define-key map "k" #'dovecote-cancel)
    (define-key map "l" #'dovecote-list-commands)
    (define-key map "d" #'dovecote-list-dead-letters)
    (define-key map "o" #'dovecote-reopen-conflict)
    map)
  "Keymap of dovecote's commands, to put on a prefix key of yours.
The README suggests a binding for it in `global-map'.

\\{dovecote-command-map}")
(fset 'dovecote-command-map dovecote-command-map)

(defvar dovecote-mode-map (make-sparse-keymap)
  "Keymap of `dovecote-mode': its menu; no key of yours is taken.")

(easy-menu-define dovecote-menu dovecote-mode-map
  "Menu of `dovecote-mode'."
  '("Dove"
    ["Correct region or paragraph" dovecote-correct-region]
    ["Cancel the call at point" dovecote-cancel]
    ["Cancel every call in this buffer" (dovecote-cancel t)]
    "---"
    ["List this Emacs' calls" dovecote-list-commands]
    ["List dead letters" dovecote-list-dead-letters]
    ["Open conflicts again" dovecote-reopen-conflict]))

;;;###autoload
(define-minor-mode dovecote-mode
  "Mirror this buffer to the dovecote server for asynchronous LLM calls.
The server is started once per Emacs, and its connection is shared by
every buffer.  Every change is reported to it, and the merged replies
of calls about this buffer (see `dovecote-correct-region') are applied
here.  The mode line shows the number of pending calls, and `!' while
the server is not connected."
  :lighter (:eval (dovecote--mode-line))
  :keymap dovecote-mode-map
  (if dovecote-mode
      (condition-case err
          (progn
            (setq dovecote--uri (dovecote--buffer-uri)
                  dovecote--version (1+ dovecote--version)
                  dovecote--opened nil)
            (add-hook 'after-change-functions #'dovecote--after-change nil t)
            (add-hook 'kill-buffer-hook #'dovecote--close nil t)
            (add-hook 'after-save-hook #'dovecote--save nil t)
            (add-hook 'change-major-mode-hook
                      #'dovecote--before-major-mode-change nil t)
            ;; Never waits for the server: it is started in the
            ;; background and opens every such buffer when it answers.
            (if-let ((conn (dovecote--live)))
                (unless (dovecote--opened-p) (dovecote--open conn))
              (dovecote--start)))
        (error (dovecote-mode -1)
               (signal (car err) (cdr err))))
    (dovecote--close)
    (remove-hook 'after-change-functions #'dovecote--after-change t)
    (remove-hook 'kill-buffer-hook #'dovecote--close t)
    (remove-hook 'after-save-hook #'dovecote--save t)
    (remove-hook 'change-major-mode-hook #'dovecote--before-major-mode-change t)
    (setq dovecote--uri nil)))

(defun dovecote-turn-on ()
  "Turn on `dovecote-mode' if this buffer is one a person edits.
That is a buffer that visits a file, whose name does not start with a
space; temporary buffers (`with-temp-buffer', an `org-mode' export)
are left alone.  Meant for a hook such as `text-mode-hook'."
  (when (and buffer-file-name
             (not (string-prefix-p " " (buffer-name)))
             (not dovecote-mode))
    (dovecote-mode 1)))

;;;; People

(defun dovecote-read-human-answer (question &optional _params)
  "Ask QUESTION in the minibuffer; return the answer, or nil if empty."
  (let ((answer (read-string (format "dovecote asks: %s\nYour answer: "
                                     question))))
    (unless (string-empty-p answer) answer)))

(defun dovecote--question (params)
  "Return the question of the `human/ask' PARAMS as one string."
  (string-join
   (delq nil
         (cons (plist-get params :system)
               (mapcar (lambda (message) (plist-get message :content))
                       (plist-get params :messages))))
   "\n\n"))

(defun dovecote--on-human-ask (params)
  "Put the question in PARAMS to a person and send the answer back."
  (let* ((id (plist-get params :commandId))
         (answer (condition-case err
                     (with-local-quit
                       (funcall dovecote-human-answer-function
                                (dovecote--question params) params))
                   (error (message "dovecote: no answer: %s"
                                   (error-message-string err))
                          nil))))
    (when (stringp answer)
      (if-let ((conn (dovecote--live)))
          (jsonrpc-async-request
           conn 'command/reply (list :commandId id :reply (list :text answer))
           :success-fn
           (lambda (result)
             (unless (eq (plist-get result :accepted) t)
               (message "dovecote: the answer came too late; %s"
                        "it is kept with the dead call")))
           :error-fn (lambda (err)
                       (message "dovecote: the answer was refused: %s"
                                (plist-get err :message)))
           :timeout-fn #'ignore)
        (message "dovecote: not connected; the question will be asked again")))))

;;;; Conflicts

(defvar-local dovecote--conflict-id nil
  "The call whose conflicts this buffer resolves.")

(defvar-local dovecote--conflict-spans nil
  "The conflicts of this buffer: a list of (INDEX START END OURS THEIRS).
START and END are markers around the conflict's block.")

(defvar dovecote-conflict-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-c C-c") #'dovecote-conflict-finish)
    (define-key map (kbd "C-c C-k") #'dovecote-conflict-abort)
    map)
  "Keymap of `dovecote-conflict-mode'.")

(define-derived-mode dovecote-conflict-mode text-mode "Dove-Conflict"
  "Resolve the collisions of a correction with your edits.
Each block shows your text (upper), the original (middle) and the
model's (lower).  Keep one with the `smerge-mode' commands
\(\\[smerge-keep-upper], \\[smerge-keep-lower]) or edit the block into
the text you want, then send the choices with \\[dovecote-conflict-finish].
\\[dovecote-conflict-abort] keeps your text everywhere.

\\{dovecote-conflict-mode-map}")

(defun dovecote--side (text)
  "Return TEXT as one side of a conflict block, on lines of its own."
  (if (string-empty-p text) "" (concat text "\n")))

(defun dovecote--show-conflicts (id buffer result)
  "Open the kept conflicts of the call ID about BUFFER, from RESULT.
RESULT is the call's `command/show' result."
  (let* ((kept (plist-get result :kept))
         ;; The kept ones, with your text as it is now, when the server
         ;; says; else all of the merge's, numbered in order.
         (conflicts (if kept
                        (append kept nil)
                      (cl-loop for conflict across (plist-get result :conflicts)
                               for index from 0
                               collect (plist-put (copy-sequence conflict)
                                                  :index index))))
         (count (length conflicts))
         (name (format "*dovecote conflict %s*" id))
         (conflict-buffer (get-buffer-create name))
         spans)
    (with-current-buffer conflict-buffer
      (let ((inhibit-read-only t))
        (erase-buffer)
        (dovecote-conflict-mode)
        (setq dovecote--conflict-id id)
        (insert (propertize
                 (format "Conflicts of the correction of %s.\n\
Keep a side of each block with %s or %s, or edit it; then %s sends them.\n\n"
                         (if (buffer-live-p buffer) (buffer-name buffer) "a buffer")
                         (substitute-command-keys "\\[smerge-keep-upper]")
                         (substitute-command-keys "\\[smerge-keep-lower]")
                         (substitute-command-keys
                          "\\<dovecote-conflict-mode-map>\\[dovecote-conflict-finish]"))
                 'face 'font-lock-comment-face))
        (cl-loop
         for conflict in conflicts
         for place from 1
         for index = (plist-get conflict :index)
         do (insert (propertize (format "Conflict %d of %d:\n" place count)
                                'face 'bold)
                    (dovecote--conflict-context buffer conflict))
         (let ((start (point))
               (ours (plist-get conflict :ours))
               (theirs (plist-get conflict :theirs)))
           (insert "<<<<<<< yours\n" (dovecote--side ours)
                   "||||||| original\n" (dovecote--side (plist-get conflict :base))
                   "=======\n" (dovecote--side theirs)
                   ">>>>>>> model\n")
           (push (list index start (point) ours theirs) spans)
           (insert "\n")))
        (setq dovecote--conflict-spans
              (mapcar (pcase-lambda (`(,index ,start ,end ,ours ,theirs))
                        (list index (copy-marker start) (copy-marker end t)
                              ours theirs))
                      spans))
        (smerge-mode 1)
        (goto-char (point-min))
        (ignore-errors (smerge-next))))
    (display-buffer conflict-buffer)
    (message "dovecote: %d conflict%s to resolve in %s" count
             (if (= count 1) "" "s") name)))

(defun dovecote--conflict-context (buffer conflict)
  "Return the line of BUFFER around CONFLICT (a kept one), as a comment line."
  (let ((start (plist-get conflict :start)))
    (if (not (and (buffer-live-p buffer) (natnump start)))
        ""
      (with-current-buffer buffer
        (save-restriction
          (widen)
          (save-excursion
            (goto-char (min (point-max) (1+ start)))
            (propertize (format "line %d: %s\n" (line-number-at-pos)
                                (buffer-substring-no-properties
                                 (line-beginning-position) (line-end-position)))
                        'face 'font-lock-comment-face)))))))

;;;###autoload
(defun dovecote-reopen-conflict (&optional id)
  "Open again the conflicts of the call ID still to resolve.
Interactively, the call at point in the list of calls, else the last
call of this Emacs that had conflicts.  A conflict buffer closed with
\\<dovecote-conflict-mode-map>\\[dovecote-conflict-abort] is found again this way."
  (interactive
   (list (or (and (derived-mode-p 'dovecote-calls-mode)
                  (plist-get (gethash (tabulated-list-get-id) dovecote--history)
                             :conflicts))
             (dovecote--last-conflicted))))
  (setq id (or id (dovecote--last-conflicted)))
  (unless id (user-error "No call with conflicts to resolve"))
  (let* ((result (jsonrpc-request (dovecote--ensure) 'command/show
                                  (list :commandId id) :timeout 30))
         (unresolved (plist-get result :unresolved))
         (entry (cl-find id (hash-table-values dovecote--history)
                         :key (lambda (entry) (plist-get entry :conflicts))
                         :test #'equal)))
    (if (and (numberp unresolved) (> unresolved 0))
        (dovecote--show-conflicts
         id (get-buffer (or (plist-get entry :buffer) "")) result)
      (message "dovecote: the conflicts of %s are all resolved"
               (dovecote--short-id id)))))

(defun dovecote--last-conflicted ()
  "Return the id of the last call of this Emacs that had conflicts, or nil."
  (let (best at)
    (maphash (lambda (_id entry)
               (when (and (plist-get entry :conflicts)
                          (> (or (plist-get entry :created) 0) (or at -1)))
                 (setq best (plist-get entry :conflicts)
                       at (or (plist-get entry :created) 0))))
             dovecote--history)
    best))

(defun dovecote--conflict-choices ()
  "Return the choices made in this conflict buffer, last conflict first.
Each is a list (INDEX CHOICE TEXT) as `conflict/resolve' takes them."
  (mapcar
   (pcase-lambda (`(,index ,start ,end ,ours ,theirs))
     (let ((text (buffer-substring-no-properties start end)))
       (when (string-match-p "^\\(<<<<<<< \\|>>>>>>> \\||||||||\\)" text)
         (user-error "Conflict %d is not resolved yet" (1+ index)))
       (when (string-suffix-p "\n" text)
         (setq text (substring text 0 -1)))
       (cond ((equal text ours) (list index "ours" nil))
             ((equal text theirs) (list index "theirs" nil))
             (t (list index "text" text)))))
   (sort (copy-sequence dovecote--conflict-spans)
         (lambda (a b) (> (car a) (car b))))))

(defun dovecote-conflict-finish ()
  "Send the resolution of every conflict in this buffer to the server.
A block left as your text keeps it (\"ours\"), one left as the model's
takes it (\"theirs\"), and any other text replaces the conflict."
  (interactive)
  (unless dovecote--conflict-id
    (user-error "Not a dovecote conflict buffer"))
  (let ((id dovecote--conflict-id)
        (choices (dovecote--conflict-choices))
        (conn (dovecote--ensure))
        (conflict-buffer (current-buffer))
        (changed 0))
    ;; One by one, last first: resolving one renumbers those after it.
    (cl-labels
        ((next (remaining)
               (if (null remaining)
                   (progn
                     (dovecote--kill-conflict-buffer conflict-buffer)
                     (message "dovecote: conflicts of %s resolved%s"
                              (dovecote--short-id id)
                              (if (> changed 0)
                                  (format "; %d kept your newer text" changed)
                                "")))
                 (pcase-let* ((`(,index ,choice ,text) (car remaining))
                              (params (list :commandId id :choice choice
                                            :index index)))
                   (when text (setq params (plist-put params :text text)))
                   (jsonrpc-async-request
                    conn 'conflict/resolve params
                    :success-fn
                    (lambda (result)
                      (when (> (length (plist-get result :changed)) 0)
                        ;; You edited it again since: your text stays.
                        (cl-incf changed)
                        (setq result (list :applied t)))
                      (if (eq (plist-get result :applied) t)
                          (progn
                            ;; Done with: a retry must not send it again.
                            (when (buffer-live-p conflict-buffer)
                              (with-current-buffer conflict-buffer
                                (setq dovecote--conflict-spans
                                      (cl-remove index dovecote--conflict-spans
                                                 :key #'car))))
                            (next (cdr remaining)))
                        (message "dovecote: conflict %d could not be applied; \
resolve it again" (1+ index))))
                    :error-fn (lambda (err)
                                (message "dovecote: conflict/resolve failed: %s"
                                         (plist-get err :message)))
                    :timeout-fn (lambda ()
                                  (message "dovecote: conflict/resolve timed out"))
                    :timeout 60)))))
      (next choices))))

(defun dovecote-conflict-abort ()
  "Close this conflict buffer; your text stays where the conflicts were.
The server keeps the conflicts; nothing is sent."
  (interactive)
  (dovecote--kill-conflict-buffer (current-buffer)))

(defun dovecote--kill-conflict-buffer (buffer)
  "Close the windows on the conflict BUFFER and kill it."
  (when (buffer-live-p buffer)
    (quit-windows-on buffer)
    (kill-buffer buffer)))

;;;; The list of this Emacs' calls

(defvar dovecote-calls-mode-map
  (let ((map (make-sparse-keymap)))
    (set-keymap-parent map tabulated-list-mode-map)
    (define-key map (kbd "RET") #'dovecote-calls-show)
    (define-key map "k" #'dovecote-calls-cancel)
    (define-key map "r" #'dovecote-calls-replay)
    (define-key map "o" #'dovecote-reopen-conflict)
    map)
  "Keymap of `dovecote-calls-mode'.")

(define-derived-mode dovecote-calls-mode tabulated-list-mode "Dove-Calls"
  "The calls and corrections this Emacs made, the newest first.
\\[dovecote-calls-show] shows the call at point with its journal,
\\[dovecote-calls-cancel] cancels it, \\[dovecote-calls-replay] replays it
when it died, \\[dovecote-reopen-conflict] opens its conflicts again,
\\[revert-buffer] refreshes the list.

\\{dovecote-calls-mode-map}"
  (setq tabulated-list-format
        [("Id" 8 t) ("State" 9 t) ("Age" 4 dovecote--age-less-p :right-align t)
         ("Buffer" 14 t) ("Text" 24 nil) ("Adapter" 0 t)])
  (setq tabulated-list-padding 1)
  (setq tabulated-list-sort-key nil)
  (setq-local revert-buffer-function #'dovecote--calls-revert)
  (tabulated-list-init-header))

(defun dovecote--calls-entries ()
  "Return the `tabulated-list-entries' of `dovecote--history', newest first."
  (let (entries)
    (maphash
     (lambda (id entry)
       (let ((created (plist-get entry :created)))
         (push (list id
                     (vector (dovecote--short-id id)
                             (or (plist-get entry :state) "")
                             (propertize (dovecote--age created)
                                         'dovecote-created created)
                             (or (plist-get entry :buffer) "")
                             (or (plist-get entry :text) "")
                             (or (plist-get entry :adapter) "")))
               entries)))
     dovecote--history)
    (sort entries (lambda (a b) (string> (car a) (car b))))))

(defun dovecote--calls-revert (&rest _ignored)
  "Show `dovecote--history' again."
  (setq tabulated-list-entries (dovecote--calls-entries))
  (tabulated-list-print t))

(defvar dovecote--calls-refresh-timer nil
  "Timer that refreshes the list of calls, or nil.")

(defun dovecote--refresh-calls-soon ()
  "Refresh the list of this Emacs' work, if shown, after the current change."
  (when (and (get-buffer "*dovecote calls*") (not dovecote--calls-refresh-timer))
    (setq dovecote--calls-refresh-timer
          (run-at-time 0.1 nil
                       (lambda ()
                         (setq dovecote--calls-refresh-timer nil)
                         (when-let ((buffer (get-buffer "*dovecote calls*")))
                           (with-current-buffer buffer
                             (dovecote--calls-revert))))))))

;;;###autoload
(defun dovecote-list-commands ()
  "List what this Emacs asked the models for, finished or not.
The list is in the buffer `*dovecote calls*'.  Each line shows the
state, age, buffer, first line and adapter of a call or correction;
see `dovecote-calls-mode' for what the keys do."
  (interactive)
  (let ((buffer (get-buffer-create "*dovecote calls*")))
    (with-current-buffer buffer
      (unless (derived-mode-p 'dovecote-calls-mode)
        (dovecote-calls-mode))
      (dovecote--calls-revert))
    (pop-to-buffer buffer)
    buffer))

(defun dovecote--calls-at-point ()
  "Return (ID . ENTRY) of the call on this line of the list."
  (let ((id (tabulated-list-get-id)))
    (unless id (user-error "No call on this line"))
    (cons id (gethash id dovecote--history))))

(defun dovecote-calls-cancel ()
  "Cancel the call on this line of the list."
  (interactive nil dovecote-calls-mode)
  (pcase-let ((`(,id . ,entry) (dovecote--calls-at-point)))
    (dovecote--cancel-id id (plist-get entry :kind))
    (message "dovecote: cancelling %s" (dovecote--short-id id))))

(defun dovecote-calls-replay (&optional timeout)
  "Replay the dead call at point, or the dead step of a stalled correction.
With TIMEOUT (a prefix argument asks for it) that many seconds."
  (interactive (list (dovecote--replay-timeout current-prefix-arg))
               dovecote-calls-mode)
  (pcase-let* ((`(,id . ,entry) (dovecote--calls-at-point))
               (dead (if (eq (plist-get entry :kind) 'flow)
                         (and (equal (plist-get entry :state) "stalled")
                              (plist-get entry :command))
                       (and (equal (plist-get entry :state) "dead") id))))
    (unless dead (user-error "Only a dead call or a stalled correction replays"))
    (dovecote-replay (list dead) timeout)
    (message "dovecote: replayed %s" (dovecote--short-id dead))))

(defun dovecote-calls-show ()
  "Show the call at point, with its full id and its journal (`command/show')."
  (interactive nil dovecote-calls-mode)
  (pcase-let* ((`(,id . ,entry) (dovecote--calls-at-point))
               (command (if (eq (plist-get entry :kind) 'flow)
                            (plist-get entry :command)
                          id)))
    (unless command (user-error "The call of this correction is not made yet"))
    (dovecote-show-command command entry (and (not (equal command id)) id))))

(defun dovecote-show-command (id &optional entry flow-id)
  "Show the call ID and its journal in a buffer; ENTRY is its history entry.
FLOW-ID names the correction the call is a step of."
  (let* ((conn (dovecote--ensure))
         (result (jsonrpc-request conn 'command/show (list :commandId id)
                                  :timeout 30))
         (command (plist-get result :command))
         (messages (append (plist-get (plist-get command :request) :messages)
                           nil))
         (buffer (get-buffer-create (format "*dovecote call %s*"
                                            (dovecote--short-id id)))))
    (with-current-buffer buffer
      (let ((inhibit-read-only t))
        (erase-buffer)
        (insert (format "Call      %s\n" id))
        (when flow-id (insert (format "Correction %s\n" flow-id)))
        (insert (format "State     %s%s\nAdapter   %s\nBuffer    %s\nAttempt   %s\n"
                        (plist-get command :state)
                        (if-let ((reason (plist-get command :reason)))
                            (format " (%s)" reason) "")
                        (plist-get command :adapter)
                        (or (plist-get entry :buffer) "")
                        (plist-get command :attempt)))
        (insert "\nAsked:\n"
                (dovecote--indent (or (plist-get (car (last messages)) :content)
                                      "")))
        (when-let ((reply (plist-get (plist-get command :reply) :text)))
          (insert "\nReply:\n" (dovecote--indent reply)))
        (insert "\nJournal:\n")
        (dolist (event (append (plist-get result :events) nil))
          (insert (format "  %s  %-8s -> %-9s %s\n"
                          (format-time-string "%F %T" (plist-get event :at))
                          (or (plist-get event :from) "")
                          (or (plist-get event :to) "")
                          (or (plist-get event :event) ""))))
        (goto-char (point-min))
        (special-mode)))
    (display-buffer buffer)
    buffer))

(defun dovecote--indent (text)
  "Return TEXT with each line indented by two spaces, ending in a newline."
  (concat (mapconcat (lambda (line) (concat "  " line))
                     (split-string (string-trim-right text) "\n") "\n")
          "\n"))

;;;; Dead letters

(defvar-local dovecote--marked nil
  "Ids of the dead letters marked in this buffer.")

(defvar dovecote-dead-letters-mode-map
  (let ((map (make-sparse-keymap)))
    (set-keymap-parent map tabulated-list-mode-map)
    (define-key map "r" #'dovecote-dead-letters-replay)
    (define-key map "R" #'dovecote-dead-letters-replay-marked)
    (define-key map "m" #'dovecote-dead-letters-mark)
    (define-key map "u" #'dovecote-dead-letters-unmark)
    map)
  "Keymap of `dovecote-dead-letters-mode'.")

(define-derived-mode dovecote-dead-letters-mode tabulated-list-mode
  "Dove-Dead"
  "The calls that died (timed out, failed) and can be replayed.
\\[dovecote-dead-letters-replay] replays the call at point,
\\[dovecote-dead-letters-mark] marks one and
\\[dovecote-dead-letters-unmark] unmarks it,
\\[dovecote-dead-letters-replay-marked] replays the marked ones,
\\[revert-buffer] refreshes the list.  With a prefix argument, a
replay asks for its timeout; otherwise `dovecote-replay-timeout'.

\\{dovecote-dead-letters-mode-map}"
  ;; Readable at half width: a short id, the prompt next, the rest after.
  (setq tabulated-list-format
        [("Id" 8 t) ("Prompt" 18 nil) ("Reason" 8 t)
         ("Age" 4 dovecote--age-less-p :right-align t) ("Buffer" 14 t)
         ("Adapter" 0 t)])
  (setq tabulated-list-padding 2)
  (setq-local revert-buffer-function #'dovecote--dead-letters-revert)
  (tabulated-list-init-header))

(defun dovecote--age (created)
  "Return how long ago the epoch time CREATED was, in short words."
  (let ((seconds (if (numberp created) (max 0 (- (float-time) created)) 0)))
    (cond ((< seconds 60) (format "%ds" (floor seconds)))
          ((< seconds 3600) (format "%dm" (floor seconds 60)))
          ((< seconds 86400) (format "%dh" (floor seconds 3600)))
          (t (format "%dd" (floor seconds 86400))))))

(defun dovecote--age-less-p (a b)
  "Return non-nil if the entry A is younger than the entry B."
  (cl-flet ((created (entry)
              (or (cl-some (lambda (cell)
                             (and (stringp cell)
                                  (get-text-property 0 'dovecote-created cell)))
                           (cadr entry))
                  0)))
    (> (created a) (created b))))

(defun dovecote--prompt-line (command)
  "Return the first line of the last message of COMMAND's request."
  (let* ((messages (plist-get (plist-get command :request) :messages))
         (last (and (> (length messages) 0) (aref messages (1- (length messages)))))
         (content (or (plist-get last :content) "")))
    (car (split-string content "\n"))))

(defun dovecote--dead-letter-entry (command)
  "Return the `tabulated-list-entries' entry of the dead COMMAND."
  (let ((created (plist-get command :createdAt)))
    (list (plist-get command :id)
          (vector (dovecote--short-id (plist-get command :id))
                  (dovecote--prompt-line command)
                  (or (plist-get command :reason) "")
                  (propertize (dovecote--age created) 'dovecote-created created)
                  (dovecote--buffer-named command)
                  (or (plist-get command :adapter) "")))))

(defun dovecote--buffer-named (command)
  "Return the buffer, or failing that the file, that the COMMAND was about."
  (let* ((id (plist-get command :id))
         (flow (plist-get command :flowId))
         (entry (or (gethash id dovecote--history)
                    (and flow (gethash flow dovecote--history))))
         (uri (plist-get command :uri)))
    (cond ((plist-get entry :buffer))
          ((stringp uri)
           (file-name-nondirectory (replace-regexp-in-string
                                    "\\`\\(file\\|buffer\\)://" "" uri)))
          (t ""))))

(defun dovecote--dead-letters-show (commands)
  "Show the dead COMMANDS (a vector) in the current buffer."
  (setq tabulated-list-entries
        (mapcar #'dovecote--dead-letter-entry (append commands nil)))
  (setq dovecote--marked
        (cl-intersection dovecote--marked (mapcar #'car tabulated-list-entries)
                         :test #'equal))
  (tabulated-list-print t)
  (save-excursion
    (goto-char (point-min))
    (while (not (eobp))
      (when (member (tabulated-list-get-id) dovecote--marked)
        (tabulated-list-put-tag "*"))
      (forward-line 1))))

(defun dovecote--dead-letters-fetch ()
  "Fetch the dead letters from the server into the current buffer."
  (let ((result (jsonrpc-request (dovecote--ensure) 'deadletter/list nil
                                 :timeout 30)))
    (dovecote--dead-letters-show (plist-get result :commands))))

(defun dovecote--dead-letters-revert (&rest _ignored)
  "Fetch the dead letters again, keeping the marked ones."
  (dovecote--dead-letters-fetch))

(defun dovecote--refresh-dead-letters-soon ()
  "Refresh the dead letters buffer, if there is one, without waiting."
  (let ((buffer (get-buffer "*dovecote dead letters*"))
        (conn (dovecote--live)))
    (when (and buffer conn)
      (jsonrpc-async-request
       conn 'deadletter/list nil
       :success-fn (lambda (result)
                     (when (buffer-live-p buffer)
                       (with-current-buffer buffer
                         (dovecote--dead-letters-show
                          (plist-get result :commands)))))
       :error-fn #'ignore
       :timeout-fn #'ignore))))

;;;###autoload
(defun dovecote-list-dead-letters ()
  "List the dead-lettered commands in the buffer `*dovecote dead letters*'."
  (interactive)
  (let ((buffer (get-buffer-create "*dovecote dead letters*")))
    (with-current-buffer buffer
      (unless (derived-mode-p 'dovecote-dead-letters-mode)
        (dovecote-dead-letters-mode))
      (dovecote--dead-letters-fetch))
    (pop-to-buffer buffer)
    buffer))

(defun dovecote--replay-timeout (arg)
  "Return the replay timeout: asked for with a prefix ARG, else the default."
  (if arg
      (read-number "Timeout of the replay (seconds): "
                   (or dovecote-replay-timeout dovecote-default-timeout 60))
    (or dovecote-replay-timeout dovecote-default-timeout)))

(defun dovecote-replay (ids &optional timeout)
  "Replay the dead commands IDS, with TIMEOUT seconds each if non-nil.
Return the new calls' ids; their replies land like the originals'.  A
dead step of one of our stalled corrections is taken over by its
replay: the correction is pending again and goes on."
  (let* ((conn (dovecote--ensure))
         (params (list :commandIds (vconcat ids)))
         result)
    (when timeout (setq params (plist-put params :timeout timeout)))
    (dovecote--expect (length ids))
    (unwind-protect
        (progn
          (setq result (jsonrpc-request conn 'deadletter/replay params
                                        :timeout 30))
          (mapcar (lambda (pair)
                    (let* ((old (plist-get pair :from))
                           (new (plist-get pair :to))
                           (flow-id (or (gethash new dovecote--step-commands)
                                        (gethash old dovecote--step-commands))))
                      (if (and flow-id (gethash flow-id dovecote--flows))
                          (dovecote--step-replayed flow-id old new)
                        (dovecote--claim new (list :replay-of old)))
                      new))
                  (plist-get result :replayed)))
      (dovecote--expect (- (length ids))))))

(defun dovecote--step-replayed (flow-id _old new)
  "Record that NEW, a replay of OLD, takes over the step of the flow FLOW-ID."
  (puthash new flow-id dovecote--step-commands)
  (let ((info (gethash flow-id dovecote--flows)))
    ;; Its notifications may have overtaken the answer: then it is known.
    (unless (equal (plist-get info :command) new)
      (dovecote--flow-put flow-id :command new :command-state "pending")))
  (force-mode-line-update t))

(defun dovecote--dead-letters-replay-ids (ids timeout)
  "Replay IDS with TIMEOUT from the dead letters buffer, and refresh it."
  (let ((new (dovecote-replay ids timeout)))
    (setq dovecote--marked (cl-set-difference dovecote--marked ids :test #'equal))
    (dovecote--dead-letters-fetch)
    (message "dovecote: replayed %d call%s" (length new)
             (if (= (length new) 1) "" "s"))
    new))

(defun dovecote-dead-letters-replay (&optional timeout)
  "Replay the dead letter at point, with TIMEOUT seconds if non-nil.
Interactively, a prefix argument asks for the timeout; otherwise it is
`dovecote-replay-timeout'."
  (interactive (list (dovecote--replay-timeout current-prefix-arg))
               dovecote-dead-letters-mode)
  (let ((id (tabulated-list-get-id)))
    (unless id (user-error "No dead letter on this line"))
    (dovecote--dead-letters-replay-ids (list id) timeout)))

(defun dovecote-dead-letters-replay-marked (&optional timeout)
  "Replay the marked dead letters, with TIMEOUT seconds if non-nil.
Interactively, a prefix argument asks for the timeout; otherwise it is
`dovecote-replay-timeout'."
  (interactive (list (dovecote--replay-timeout current-prefix-arg))
               dovecote-dead-letters-mode)
  (unless dovecote--marked (user-error "No dead letter is marked"))
  (dovecote--dead-letters-replay-ids dovecote--marked timeout))

(defun dovecote-dead-letters-mark ()
  "Mark the dead letter at point and move to the next line."
  (interactive nil dovecote-dead-letters-mode)
  (when-let ((id (tabulated-list-get-id)))
    (cl-pushnew id dovecote--marked :test #'equal)
    (tabulated-list-put-tag "*" t)))

(defun dovecote-dead-letters-unmark ()
  "Unmark the dead letter at point and move to the next line."
  (interactive nil dovecote-dead-letters-mode)
  (when-let ((id (tabulated-list-get-id)))
    (setq dovecote--marked (delete id dovecote--marked))
    (tabulated-list-put-tag " " t)))

(provide 'dovecote)
;;; dovecote.el ends here
