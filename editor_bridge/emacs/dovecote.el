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
;;   (add-hook 'text-mode-hook #'dovecote-mode)
;;   (global-set-key (kbd "C-c d") #'dovecote-correct-region)

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

(defcustom dovecote-server-directory "~/"
  "The directory the server runs in.
Its default database is .dovecote/dovecote.db there (unless
`dovecote-server-command' gives \"--db\" or DOVECOTE_DB is set).  A
fixed directory makes a restarted server find the calls still pending."
  :type 'directory)

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

;;;; State

(defvar dovecote-mode) ; Defined by `define-minor-mode' below.

(defvar dovecote--connection nil
  "The `jsonrpc-process-connection' to the server, shared by all buffers.")

(defvar dovecote--commands (make-hash-table :test #'equal)
  "This Emacs' calls not yet in a terminal state: id -> plist.
The plist has `:state', and maybe `:buffer', `:overlay', `:callback'.")

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

(defun dovecote--ensure ()
  "Return a live connection, starting the server if needed."
  (or (dovecote--live)
      (if dovecote--connecting
          (user-error "The dovecote server is starting; try again")
        (dovecote--connect))))

(defun dovecote--connect ()
  "Start the server, initialize it and return the connection.
Every buffer in `dovecote-mode' is opened on it again, and the calls
still pending are watched on it."
  (setq dovecote--connecting t)
  (unwind-protect (dovecote--connect-1)
    (setq dovecote--connecting nil)))

(defun dovecote--server-command ()
  "Return `dovecote-server-command', its program's file name expanded."
  (let ((program (car-safe dovecote-server-command)))
    (if (and (stringp program) (file-name-directory program))
        (cons (expand-file-name program) (cdr dovecote-server-command))
      dovecote-server-command)))

(defun dovecote--connect-1 ()
  "Do the work of `dovecote--connect'."
  (when dovecote--reconnect-timer
    (cancel-timer dovecote--reconnect-timer)
    (setq dovecote--reconnect-timer nil))
  (when-let ((old dovecote--connection))
    (setq dovecote--connection nil)
    (let ((dovecote--shutting-down t))
      (ignore-errors (jsonrpc-shutdown old))))
  (let* ((name "dovecote")
         (command (dovecote--server-command))
         (default-directory
           (file-name-as-directory
            (expand-file-name (if (file-directory-p dovecote-server-directory)
                                  dovecote-server-directory
                                temporary-file-directory))))
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
            (error
             (user-error "Cannot start the dovecote server %S: %s \
\(see `dovecote-server-command')"
                         command (error-message-string err))))))
    (condition-case err
        (jsonrpc-request conn 'initialize
                         (list :clientInfo
                               (list :name "emacs" :version emacs-version))
                         :timeout 30)
      (error
       (let ((dovecote--shutting-down t)
             (stderr (dovecote--stderr conn)))
         (ignore-errors (jsonrpc-shutdown conn t))
         (user-error "The dovecote server %S did not start: %s%s"
                     command (error-message-string err) stderr))))
    (setq dovecote--connection conn
          dovecote--reconnect-wait nil)
    (dolist (buffer (dovecote--buffers))
      (with-current-buffer buffer (dovecote--open conn)))
    (dovecote--watch conn)
    (force-mode-line-update t)
    conn))

(defun dovecote--stderr (conn)
  "Return the end of what the server of CONN wrote to its stderr, or \"\"."
  (let ((buffer (ignore-errors (jsonrpc-stderr-buffer conn))))
    (if (not (buffer-live-p buffer))
        ""
      ;; Let the pipe deliver what the dying server wrote.
      (accept-process-output nil 0.1)
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
  "Restart the server soon, if a buffer or a pending call needs it."
  (when (and (not dovecote--shutting-down)
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
  (unless (or (dovecote--live) dovecote--shutting-down dovecote--connecting)
    (condition-case err
        (progn (dovecote--connect)
               (message "dovecote: reconnected"))
      (error
       (setq dovecote--reconnect-wait
             (min 60 (* 2 (or dovecote--reconnect-wait
                              dovecote-reconnect-delay))))
       (message "dovecote: cannot restart the server (%s); retrying in %gs"
                (error-message-string err) dovecote--reconnect-wait)
       (dovecote--schedule-reconnect)))))

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

(defun dovecote--after-change (beg end old-len)
  "Report the change of BEG..END, which replaced OLD-LEN characters.
Offsets are code points from the start of the whole buffer."
  (when dovecote--uri
    (cl-incf dovecote--version)
    (let* ((size (buffer-size))
           (change
            (if (= size (+ dovecote--size (- end beg) (- old-len)))
                (list :start (1- beg) :end (+ (1- beg) old-len)
                      :text (buffer-substring-no-properties beg end))
              ;; The hook's arguments do not add up: send the whole text.
              (save-restriction
                (widen)
                (list :start 0 :end dovecote--size
                      :text (buffer-substring-no-properties
                             (point-min) (point-max)))))))
      (setq dovecote--size size)
      ;; Sent at once, even while a call about this buffer is being
      ;; asked for: the server takes a call's snapshot before it reads
      ;; the next message, so the change lands after the snapshot.
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
        (dovecote--schedule-reconnect)))))

(defun dovecote--close ()
  "Close the current buffer's document on the server."
  (when (and dovecote--uri (dovecote--opened-p))
    (ignore-errors
      (jsonrpc-notify dovecote--opened 'document/close
                      (list :uri dovecote--uri))))
  (setq dovecote--opened nil))

(defun dovecote--replace (start end text)
  "Replace the text from START to END with TEXT, moving markers sensibly."
  (save-excursion
    (goto-char start)
    (insert text)
    (delete-region (point) (+ (point) (- end start)))))

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
                                 (progn
                                   (cl-loop for edit across edits
                                            do (dovecote--replace
                                                (1+ (plist-get edit :start))
                                                (1+ (plist-get edit :end))
                                                (plist-get edit :text)))
                                   t)
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

(defun dovecote--mode-line ()
  "Return the `dovecote-mode' lighter: the pending count, `!' offline."
  (let ((pending (dovecote-pending-count)))
    (concat " Dove"
            (if (> pending 0) (format ":%d" pending) "")
            (if (dovecote--live) "" "!"))))

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
      (force-mode-line-update t)
      (dovecote--finished id info state params))
     (t (puthash id (plist-put info :state state) dovecote--commands)))))

(defun dovecote--finished (id info state params)
  "Wind up the call ID (with INFO), now in terminal STATE (from PARAMS)."
  (when-let ((overlay (plist-get info :overlay)))
    (delete-overlay overlay))
  (pcase state
    ("dead"
     (message "dovecote: call %s is dead (%s); %s replays it" id
              (or (plist-get params :reason) "?")
              (substitute-command-keys "\\[dovecote-list-dead-letters]"))
     (dovecote--refresh-dead-letters-soon))
    ("cancelled" (message "dovecote: call %s was cancelled" id)))
  (dovecote--show-result id state (plist-get info :buffer)
                         (plist-get info :callback))
  (run-hook-with-args 'dovecote-finished-functions id state))

(defun dovecote--show-result (id state buffer callback)
  "Fetch the result of the call ID, over in STATE, about BUFFER.
Open its kept conflicts, if any, and call CALLBACK, if non-nil, with
the `command/show' result."
  (when-let ((conn (and (or callback (equal state "done")) (dovecote--live))))
    (jsonrpc-async-request
     conn 'command/show (list :commandId id)
     :success-fn
     (lambda (result)
       (let ((unresolved (plist-get result :unresolved)))
         (when (and (equal state "done") (numberp unresolved) (> unresolved 0))
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
         (info (list :buffer buffer :callback callback)))
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

;;;; Corrections: the server's "corrections" flow

(defun dovecote--flow-put (id &rest pairs)
  "Set the PAIRS (keys and values) in the plist of the flow ID, if ours."
  (when-let ((info (gethash id dovecote--flows)))
    (while pairs
      (setq info (plist-put info (pop pairs) (pop pairs))))
    (puthash id info dovecote--flows)))

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
                         :asking nil))
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
%s replays it" id (or (plist-get params :reason) "?")
              (substitute-command-keys "\\[dovecote-list-dead-letters]"))
     (dovecote--refresh-dead-letters-soon))
    ("cancelled" (message "dovecote: call %s was cancelled" id)))
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
    ("cancelled" (message "dovecote: correction %s was cancelled" id))
    ("failed"
     (if-let ((conn (dovecote--live)))
         (jsonrpc-async-request
          conn 'flow/show (list :flowId id)
          :success-fn (lambda (result)
                        (message "dovecote: correction %s failed: %s" id
                                 (or (plist-get result :error) "?")))
          :error-fn (lambda (_err)
                      (message "dovecote: correction %s failed" id))
          :timeout-fn #'ignore)
       (message "dovecote: correction %s failed" id)))))

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
(defun dovecote-correct-region (start end)
  "Ask for corrections of the region from START to END; return at once.
This starts the server's \"corrections\" flow on the region: its text
goes unchanged as the one user message, with
`dovecote-correction-instruction' as the system prompt, to
`dovecote-adapter', with the timeout `dovecote-default-timeout'.  Keep
typing: the reply is merged into the region as it is when the reply
arrives, colliding edits handled as `dovecote-on-conflict' says.  If
the call dies, the correction stalls until its dead letter is
replayed (see `dovecote-list-dead-letters')."
  (interactive "r")
  (pcase-let ((`(,start . ,end) (dovecote--clip (min start end)
                                                (max start end))))
    (when (= start end)
      (user-error "The region is empty"))
    (unless dovecote-mode (dovecote-mode 1))
    (dovecote--start-correction (current-buffer) start end)
    (when (called-interactively-p 'interactive)
      (deactivate-mark)
      (message "dovecote: correction asked (%d pending)"
               (dovecote-pending-count)))))

;;;; The minor mode

(defun dovecote--before-major-mode-change ()
  "Turn `dovecote-mode' off before the major mode wipes its variables."
  (dovecote-mode -1))

;;;###autoload
(define-minor-mode dovecote-mode
  "Mirror this buffer to the dovecote server for asynchronous LLM calls.
The server is started once per Emacs, and its connection is shared by
every buffer.  Every change is reported to it, and the merged replies
of calls about this buffer (see `dovecote-correct-region') are applied
here.  The mode line shows the number of pending calls, and `!' while
the server is not connected."
  :lighter (:eval (dovecote--mode-line))
  (if dovecote-mode
      (condition-case err
          (progn
            (setq dovecote--uri (dovecote--buffer-uri)
                  dovecote--version (1+ dovecote--version)
                  dovecote--opened nil)
            (add-hook 'after-change-functions #'dovecote--after-change nil t)
            (add-hook 'kill-buffer-hook #'dovecote--close nil t)
            (add-hook 'change-major-mode-hook
                      #'dovecote--before-major-mode-change nil t)
            (let ((conn (dovecote--ensure)))
              (unless (dovecote--opened-p) (dovecote--open conn))))
        (error (dovecote-mode -1)
               (signal (car err) (cdr err))))
    (dovecote--close)
    (remove-hook 'after-change-functions #'dovecote--after-change t)
    (remove-hook 'kill-buffer-hook #'dovecote--close t)
    (remove-hook 'change-major-mode-hook #'dovecote--before-major-mode-change t)
    (setq dovecote--uri nil)))

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
  (let* ((conflicts (append (plist-get result :conflicts) nil))
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
         for index from 0
         do (insert (propertize (format "Conflict %d of %d:\n" (1+ index) count)
                                'face 'bold))
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
        (conflict-buffer (current-buffer)))
    ;; One by one, last first: resolving one renumbers those after it.
    (cl-labels
        ((next (remaining)
               (if (null remaining)
                   (progn
                     (dovecote--kill-conflict-buffer conflict-buffer)
                     (message "dovecote: conflicts of %s resolved" id))
                 (pcase-let* ((`(,index ,choice ,text) (car remaining))
                              (params (list :commandId id :choice choice
                                            :index index)))
                   (when text (setq params (plist-put params :text text)))
                   (jsonrpc-async-request
                    conn 'conflict/resolve params
                    :success-fn
                    (lambda (result)
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
  (setq tabulated-list-format
        [("Id" 36 t) ("Adapter" 10 t) ("Reason" 17 t)
         ("Age" 6 dovecote--age-less-p :right-align t) ("Prompt" 0 nil)])
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
  (> (or (get-text-property 0 'dovecote-created (aref (cadr a) 3)) 0)
     (or (get-text-property 0 'dovecote-created (aref (cadr b) 3)) 0)))

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
          (vector (plist-get command :id)
                  (or (plist-get command :adapter) "")
                  (or (plist-get command :reason) "")
                  (propertize (dovecote--age created) 'dovecote-created created)
                  (dovecote--prompt-line command)))))

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
