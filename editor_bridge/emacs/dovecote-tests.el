;;; dovecote-tests.el --- ERT tests of dovecote.el  -*- lexical-binding: t; -*-

;; Copyright (C) 2025 The dovecote authors

;; This file is not part of GNU Emacs.

;;; Commentary:

;; End-to-end tests: each test starts `dovecote serve --stdio' on a
;; fresh database and drives dovecote.el as a person would, typing into
;; buffers while the scripted model is slow.  Run them with
;; `make emacs-test', or by hand from the top of the repository:
;;
;;   DOVECOTE=$PWD/.venv/bin/dovecote $EMACS --batch -Q \
;;     -L editor_bridge/emacs -l dovecote-tests -f ert-run-tests-batch-and-exit
;;
;; DOVECOTE names the dovecote executable; without it, `dovecote' is
;; looked up on the PATH.

;;; Code:

(require 'ert)
(require 'dovecote)
(require 'smerge-mode)

(defvar dovecote-test--executable (or (getenv "DOVECOTE") "dovecote")
  "The dovecote executable the tests start.")

(defvar dovecote-test--directory nil
  "The temporary directory of the current test's database.")

(defun dovecote-test--wait (predicate timeout what)
  "Wait until PREDICATE gives non-nil, at most TIMEOUT seconds.
Return PREDICATE's value; fail the test naming WHAT on timeout."
  (let ((deadline (+ (float-time) timeout))
        value)
    (while (and (not (setq value (funcall predicate)))
                (< (float-time) deadline))
      (accept-process-output nil 0.02))
    (or value
        (ert-fail (list "Timed out waiting for" what)))))

(defmacro dovecote-test--wait-until (form &optional timeout)
  "Wait until FORM is non-nil, at most TIMEOUT seconds (default 20).
Process output and timers run meanwhile.  Return FORM's value."
  (declare (indent 0) (debug t))
  `(dovecote-test--wait (lambda () ,form) ,(or timeout 20) ',form))

(defvar dovecote-test--messages nil
  "The messages shown during the current test, the most recent first.")

(defun dovecote-test--record-message (format-string &rest args)
  "Record the message FORMAT-STRING with ARGS in `dovecote-test--messages'."
  (when (stringp format-string)
    (push (apply #'format-message format-string args) dovecote-test--messages)))

(advice-add 'message :before #'dovecote-test--record-message)

(defun dovecote-test--said (regexp)
  "Return the messages shown in this test that match REGEXP, oldest first."
  (reverse (cl-remove-if-not (lambda (m) (string-match-p regexp m))
                             dovecote-test--messages)))

(defun dovecote-test--teardown ()
  "Stop the server, kill the test buffers and delete the database."
  (dovecote-shutdown)
  (dolist (buffer (buffer-list))
    (when (string-match-p "\\`\\*dovecote\\(-test\\| conflict\\| dead\\)"
                          (buffer-name buffer))
      (with-current-buffer buffer (set-buffer-modified-p nil))
      (kill-buffer buffer)))
  (when dovecote-test--directory
    (delete-directory dovecote-test--directory t)))

(defmacro dovecote-test--with-server (&rest body)
  "Run BODY with dovecote.el talking to a fresh server and database."
  (declare (indent 0) (debug t))
  `(let* ((dovecote-test--directory (make-temp-file "dovecote-test-" t))
          (dovecote-test--messages nil)
          (dovecote--history (make-hash-table :test #'equal))
          (dovecote-server-command
           (list dovecote-test--executable "serve" "--stdio" "--db"
                 (expand-file-name "test.db" dovecote-test--directory)))
          (dovecote-adapter "scripted")
          (dovecote-on-conflict "ask")
          (dovecote-default-timeout nil)
          (dovecote-replay-timeout nil)
          (dovecote-finished-functions nil)
          (dovecote-human-answer-function
           (lambda (&rest _) (error "No question was expected"))))
     (unwind-protect (progn ,@body)
       (dovecote-test--teardown))))

(defun dovecote-test--buffer (text &optional name)
  "Return a new buffer NAME holding TEXT, in `dovecote-mode'."
  (let ((buffer (generate-new-buffer (or name "*dovecote-test*"))))
    (with-current-buffer buffer
      (insert text)
      (goto-char (point-min))
      (dovecote-mode 1)
      ;; The server starts in the background; its answer opens the buffer.
      (dovecote-test--wait-until (dovecote--opened-p)))
    buffer))

(defun dovecote-test--region (from to)
  "Return (START . END) of the text from the string FROM to the string TO."
  (save-excursion
    (goto-char (point-min))
    (let ((start (progn (search-forward from) (match-beginning 0))))
      (cons start (search-forward to)))))

(defun dovecote-test--replace (old new)
  "Type NEW over the first OLD in the current buffer, as a person would."
  (save-excursion
    (goto-char (point-min))
    (search-forward old)
    (replace-match new t t)))

(defun dovecote-test--correct-until-dead ()
  "Correct the whole buffer with a 0.3 s timeout; return the dead call's id."
  (let* ((dead nil)
         (dovecote-finished-functions
          (list (lambda (id state) (when (equal state "dead") (setq dead id))))))
    (let ((dovecote-default-timeout 0.3))
      (dovecote-correct-region (point-min) (point-max)))
    (dovecote-test--wait-until dead)
    dead))

(defun dovecote-test--lighter ()
  "Return the `dovecote-mode' mode line text of the current buffer.
`format-mode-line' gives nothing in batch mode: evaluate the lighter."
  (let ((lighter (cadr (assq 'dovecote-mode minor-mode-alist))))
    (should (eq (car-safe lighter) :eval))
    (eval (cadr lighter) t)))

(defun dovecote-test--states ()
  "Return the states of the pending LLM jobs of this Emacs.
That of a correction is its step command's, or nil before it is known."
  (let (states)
    (maphash (lambda (_id info) (push (plist-get info :state) states))
             dovecote--commands)
    (maphash (lambda (_id info) (push (plist-get info :command-state) states))
             dovecote--flows)
    states))

(defun dovecote-test--flows (&rest states)
  "Return the server's flows, as `flow/list' gives them, in STATES if any."
  (append (plist-get (jsonrpc-request (dovecote--live) 'flow/list
                                      (and states
                                           (list :states (vconcat states))))
                     :flows)
          nil))

(ert-deftest dovecote-test-typing-before-inside-and-after ()
  "A correction lands while the person types before, inside and after it."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer
         (concat "Dear 🦆 friend,\n"
                 "#delay 1\nI recieve teh letter and beleive every word of it."
                 "\nYours, Ann"))
      (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "of it.")))
        (dovecote-correct-region start end))
      (should (= (dovecote-pending-count) 1))
      (goto-char (point-max))
      (insert " (sent from my 📱)")
      (dovecote-test--replace "every word" "each and every word")
      (goto-char (point-min))
      (insert "Re: your note\n")
      (should (= (dovecote-pending-count) 1))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (equal (buffer-string)
                     (concat "Re: your note\nDear 🦆 friend,\n"
                             "I receive the letter and believe each and every"
                             " word of it.\nYours, Ann (sent from my 📱)"))))))

(ert-deftest dovecote-test-multibyte-offsets ()
  "Offsets are code points: accents, emoji and CJK before the region."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer
         (concat "Ça va? 🦆🦆 日本語のテキスト: teh duck.\n"
                 "#delay 0.5\nCafé: recieve 🦆 teh 文字.\nEnd 🎉"))
      (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "文字.")))
        (dovecote-correct-region start end))
      (goto-char (point-min))
      (insert "🐣 ")
      (dovecote-test--replace "End" "終わり")
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (equal (buffer-string)
                     (concat "🐣 Ça va? 🦆🦆 日本語のテキスト: teh duck.\n"
                             "Café: receive 🦆 the 文字.\n終わり 🎉"))))))

(ert-deftest dovecote-test-pending-count-and-mode-line ()
  "The pending count goes up with each call and back to 0 as they land.
What is typed right after asking is sent at once, before the server
has answered: the server takes the region's snapshot first, so the
model never sees it (the typed typo stays), and the next call's
offsets, which count it, are right."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer
         "#delay 0.5\nTeh first line.\n#delay 0.5\nTeh second line.\n")
      (should (= (dovecote-pending-count) 0))
      (should (equal (dovecote-test--lighter) " Dove"))
      (let ((version dovecote--version))
        (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "first line.\n")))
          (dovecote-correct-region start end))
        (should (= (dovecote-pending-count) 1))
        (should (equal (dovecote-test--lighter) " Dove:1"))
        ;; Not answered yet: the flow's id has not come back.
        (should (= dovecote--expected 1))
        (dovecote-test--replace "first line" "first recieve line")
        (goto-char (point-max))
        (insert "Teh end.\n")
        (should (= dovecote--version (+ version 2))))
      (pcase-let ((`(,start . ,end)
                   (dovecote-test--region "#delay 0.5\nTeh second" "line.\n")))
        (dovecote-correct-region start end))
      (should (= (dovecote-pending-count) 2))
      (should (equal (dovecote-test--lighter) " Dove:2"))
      (dovecote-test--wait-until (equal (dovecote-test--states) '("sent" "sent")))
      (should (= (dovecote-pending-count) 2))
      (should (= (length (dovecote-test--flows "waiting")) 2))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (equal (dovecote-test--lighter) " Dove"))
      (should (equal (buffer-string)
                     "The first recieve line.\nThe second line.\nTeh end.\n"))
      (let ((flows (dovecote-test--flows)))
        (should (= (length flows) 2))
        (dolist (flow flows)
          (should (equal (plist-get flow :name) "corrections"))
          (should (equal (plist-get flow :state) "completed"))
          (should (equal (plist-get (plist-get flow :params) :instruction)
                         dovecote-correction-instruction)))))))

(ert-deftest dovecote-test-apply-edit-checks-the-version ()
  "An edit for another version is refused; a matching one is applied and reported."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "abc teh")
      (let ((version dovecote--version))
        (should (equal (dovecote--apply-edit
                        (list :uri dovecote--uri :version (1- version)
                              :edits (vector (list :start 0 :end 1 :text "X"))))
                       '(:applied :json-false)))
        (should (equal (buffer-string) "abc teh"))
        ;; Last first, each against the text before the edit set.
        (should (equal (dovecote--apply-edit
                        (list :uri dovecote--uri :version version
                              :edits (vector (list :start 2 :end 3 :text "🦆")
                                             (list :start 0 :end 1 :text "A"))))
                       '(:applied t)))
        (should (equal (buffer-string) "Ab🦆 teh"))
        (should (> dovecote--version version)))
      ;; The server's copy followed: a correction still lands right.
      (dovecote-correct-region (point-min) (point-max))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (equal (buffer-string) "Ab🦆 the")))))

(ert-deftest dovecote-test-timeout-dead-letter-and-replay ()
  "A call that times out is listed as a dead letter; `r' replays it."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 1\nTeh end.")
      (let ((dead (dovecote-test--correct-until-dead)))
        ;; Stalled: waiting for a decision, not pending; still shown, and
        ;; the highlight says so (issue 14, finding 5).
        (should (= (dovecote-pending-count) 0))
        (should (equal (dovecote-test--lighter) " Dove:1"))
        (should (equal (mapcar (lambda (o) (overlay-get o 'face))
                               (overlays-in (point-min) (point-max)))
                       '(dovecote-stalled)))
        (should (= (hash-table-count dovecote--flows) 1))
        (dovecote-test--wait-until
          (equal (mapcar (lambda (flow) (plist-get flow :state))
                         (dovecote-test--flows))
                 '("stalled")))
        (should (= (dovecote-pending-count) 0))
        (should (equal (buffer-string) "#delay 1\nTeh end."))
        (goto-char (point-min))
        (insert "P.S. ")
        (with-current-buffer (dovecote-list-dead-letters)
          (should (equal (buffer-name) "*dovecote dead letters*"))
          (should (equal (mapcar #'car tabulated-list-entries) (list dead)))
          (goto-char (point-min))
          (should (equal (tabulated-list-get-id) dead))
          (let ((line (buffer-substring (line-beginning-position)
                                        (line-end-position))))
            ;; A short id, the prompt next: readable at half width.
            (should (string-match-p
                     (concat "\\`  " (regexp-quote (substring dead -8))
                             " +#delay 1 +timeout +[0-9]+s +\\*dovecote-test\\* +scripted$")
                     line)))
          ;; Not one of this session's calls: the server names its document.
          (let ((dovecote--history (make-hash-table :test #'equal)))
            (revert-buffer)
            (goto-char (point-min))
            (should (string-match-p " \\*dovecote-test\\* +scripted$"
                                    (buffer-substring (line-beginning-position)
                                                      (line-end-position)))))
          (let ((dovecote-replay-timeout 10))
            (call-interactively (key-binding "r")))
          (should (= (dovecote-pending-count) 1))
          (should (null tabulated-list-entries))
          (should (equal (buffer-string) "")))
        (should (equal (dovecote-test--lighter) " Dove:1"))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should (equal (buffer-string) "P.S. The end."))
        (should (zerop (hash-table-count dovecote--flows)))
        (let ((flow (car (dovecote-test--flows))))
          (should (equal (plist-get flow :state) "completed"))
          (should (equal (mapcar (lambda (event) (plist-get event :to))
                                 (plist-get (jsonrpc-request
                                             (dovecote--live) 'flow/show
                                             (list :flowId (plist-get flow :id)))
                                            :events))
                         '("running" "waiting" "stalled" "waiting" "running"
                           "completed"))))))))

(ert-deftest dovecote-test-replay-marked-dead-letters ()
  "Marked dead letters are replayed together with `R'."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer "#delay 1\nTeh one.\n#delay 1\nTeh two.\n")
      (let* ((dead nil)
             (dovecote-finished-functions
              (list (lambda (id state) (when (equal state "dead") (push id dead))))))
        (let ((dovecote-default-timeout 0.2))
          (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "one.\n")))
            (dovecote-correct-region start end))
          (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay 1\nTeh two" "\n")))
            (dovecote-correct-region start end)))
        (dovecote-test--wait-until (= (length dead) 2))
        (with-current-buffer (dovecote-list-dead-letters)
          (should (equal (sort (mapcar #'car tabulated-list-entries) #'string<)
                         (sort (copy-sequence dead) #'string<)))
          (goto-char (point-min))
          (call-interactively (key-binding "m"))
          (call-interactively (key-binding "m"))
          (goto-char (point-min))
          (should (looking-at-p "\\*"))
          (forward-line 1)
          (should (looking-at-p "\\*"))
          (call-interactively (key-binding "u"))
          (forward-line -1)
          (should (looking-at-p " "))
          (call-interactively (key-binding "m"))
          (let ((dovecote-replay-timeout 10))
            (call-interactively (key-binding "R")))
          (should (null tabulated-list-entries)))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should (equal (buffer-string) "The one.\nThe two.\n"))))))

(ert-deftest dovecote-test-conflict-ask-opens-smerge ()
  "Typing over words the model corrects opens the conflicts in smerge."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer "#delay 1\nTeh plan is definately wierd, we recieve it.")
      (let ((dovecote-on-conflict "ask")
            (conflicts nil))
        (dovecote-correct-region (point-min) (point-max))
        (dovecote-test--replace "wierd" "odd")
        (dovecote-test--replace "recieve" "get")
        (setq conflicts
              (dovecote-test--wait-until
                (cl-find-if (lambda (buffer)
                              (string-prefix-p "*dovecote conflict " (buffer-name buffer)))
                            (buffer-list))))
        ;; Named after the flow's step command, whose conflicts they are.
        (let ((steps (plist-get (jsonrpc-request
                                 (dovecote--live) 'flow/show
                                 (list :flowId (plist-get (car (dovecote-test--flows))
                                                          :id)))
                                :steps)))
          (should (equal (buffer-name conflicts)
                         (format "*dovecote conflict %s*"
                                 (plist-get (aref steps 0) :commandId)))))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        ;; Until resolved, the person's words stay.
        (should (equal (buffer-string) "The plan is definitely odd, we get it."))
        (with-current-buffer conflicts
          (should smerge-mode)
          (should (derived-mode-p 'dovecote-conflict-mode))
          (goto-char (point-min))
          (smerge-next)
          (should (looking-at-p (concat "<<<<<<< yours\nodd\n"
                                        "||||||| original\nwierd\n"
                                        "=======\nweird\n>>>>>>> model\n")))
          (smerge-keep-lower)
          (smerge-next)
          (should (looking-at-p "<<<<<<< yours\nget\n"))
          (smerge-keep-upper)
          (goto-char (point-max))
          (search-backward "get")
          (replace-match "obtain" t t)
          (dovecote-conflict-finish))
        (dovecote-test--wait-until
          (equal (buffer-string) "The plan is definitely weird, we obtain it."))
        (dovecote-test--wait-until (not (buffer-live-p conflicts)))))))

(ert-deftest dovecote-test-server-killed-and-restarted ()
  "When the server dies, the client restarts it and the pending call lands."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 1\nWe beleive in teh plan.")
      (dovecote-correct-region (point-min) (point-max))
      (dovecote-test--wait-until (equal (dovecote-test--states) '("sent")))
      (let ((old (dovecote--process)))
        (kill-process old)
        (dovecote-test--wait-until (not (process-live-p old)))
        (should (string-suffix-p "!" (dovecote-test--lighter)))
        ;; Typed while no server runs: sent with the next document/open.
        (goto-char (point-min))
        (insert "Note: ")
        (dovecote-test--wait-until (and (dovecote--live)
                                        (not (eq (dovecote--process) old))))
        (should (= (dovecote-pending-count) 1))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should (equal (buffer-string) "Note: We believe in the plan."))
        (should (equal (dovecote-test--lighter) " Dove"))
        (should (zerop (hash-table-count dovecote--flows)))
        (should (equal (mapcar (lambda (flow) (plist-get flow :state))
                               (dovecote-test--flows))
                       '("completed")))))))

(ert-deftest dovecote-test-stalled-correction-after-a-restart ()
  "A correction stalled before a restart is found stalled; replayed, it lands.
The new server does not send the flow's `flow/state' to this Emacs
\(it did not start it): the client asks with `flow/show'."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 1\nWe beleive teh plan.")
      (let ((dead (dovecote-test--correct-until-dead)))
        (should (= (dovecote-pending-count) 0))
        (let ((old (dovecote--process)))
          (kill-process old)
          (dovecote-test--wait-until (not (process-live-p old)))
          (goto-char (point-max))
          (insert " Really.")
          (dovecote-test--wait-until (and (dovecote--live)
                                          (not (eq (dovecote--process) old)))))
        ;; Still ours, still stalled on the same dead command.
        (should (= (hash-table-count dovecote--flows) 1))
        (should (= (dovecote-pending-count) 0))
        (let ((info (car (hash-table-values dovecote--flows))))
          (dovecote-test--wait-until (equal (plist-get info :state) "stalled"))
          (should (equal (plist-get info :command) dead))
          (should (equal (plist-get info :command-state) "dead")))
        (let ((new (dovecote-replay (list dead) 10)))
          (should (equal new (list (plist-get (car (hash-table-values dovecote--flows))
                                              :command)))))
        (should (= (dovecote-pending-count) 1))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should (equal (buffer-string) "We believe the plan. Really."))
        (should (zerop (hash-table-count dovecote--flows)))
        (should (equal (mapcar (lambda (flow) (plist-get flow :state))
                               (dovecote-test--flows))
                       '("completed")))))))

(ert-deftest dovecote-test-failed-correction ()
  "A correction whose flow fails is no longer pending and changes nothing."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "Teh end.")
      (let ((dovecote-adapter "no-such-adapter"))
        (dovecote-correct-region (point-min) (point-max)))
      (should (= (dovecote-pending-count) 1))
      (should (overlays-in (point-min) (point-max)))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (zerop (hash-table-count dovecote--flows)))
      (should-not (overlays-in (point-min) (point-max)))
      (should (equal (buffer-string) "Teh end."))
      (let ((flow (car (dovecote-test--flows))))
        (should (equal (plist-get flow :state) "failed"))
        (should (string-match-p "no-such-adapter" (plist-get flow :error)))))))

(ert-deftest dovecote-test-flow-notifications-are-matched-by-flow ()
  "Notifications that overtake `flow/start''s answer are kept for it;
those of flows not ours (another editor's, on the same document) are
ignored."
  (dovecote-test--with-server
    (let* ((finished nil)
           (dovecote-finished-functions
            (list (lambda (id state) (push (cons id state) finished)))))
      ;; Nothing is being asked for: a stranger's step is ignored.
      (dovecote--handle-notification
       nil 'command/state (list :commandId "c0" :state "sent" :flowId "f0"))
      (dovecote--handle-notification
       nil 'flow/state (list :flowId "f0" :state "waiting" :step 1))
      (should (= (dovecote-pending-count) 0))
      (should (null finished))
      ;; A flow/start in flight: its notifications come before its id.
      (dovecote--expect 1)
      (dovecote--handle-notification
       nil 'flow/state (list :flowId "f1" :state "waiting" :step 1))
      (dovecote--handle-notification
       nil 'command/state (list :commandId "c1" :state "dead" :reason "timeout"
                                :flowId "f1"))
      (dovecote--handle-notification
       nil 'command/state (list :commandId "c2" :state "sent" :flowId "f2"))
      (should (= (dovecote-pending-count) 1))
      (dovecote--claim-flow "f1" (list :state "running" :command nil
                                       :command-state nil :conn (dovecote--live)))
      (dovecote--expect -1)
      (should (equal finished '(("c1" . "dead"))))
      ;; Stalled: not pending, still ours.
      (should (= (dovecote-pending-count) 0))
      (should (gethash "f1" dovecote--flows))
      (should-not (gethash "f2" dovecote--flows))
      (should-not (gethash "c2" dovecote--step-commands))
      (dovecote--handle-notification
       nil 'flow/state (list :flowId "f1" :state "stalled" :step 1))
      (should (= (dovecote-pending-count) 0))
      ;; Replayed elsewhere: the flow goes on, pending again.
      (dovecote--handle-notification
       nil 'flow/state (list :flowId "f1" :state "waiting" :step 1))
      (should (= (dovecote-pending-count) 1))
      (dovecote--handle-notification
       nil 'flow/state (list :flowId "f1" :state "completed" :step 1))
      (should (= (dovecote-pending-count) 0))
      (should (zerop (hash-table-count dovecote--flows)))
      (should (zerop (hash-table-count dovecote--step-commands))))))

(ert-deftest dovecote-test-submit-a-plain-call ()
  "`dovecote-submit' still sends `command/submit', without a flow."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "Intro.\n#delay 0.3\nTeh end.")
      (let ((shown nil)
            (text nil))
        (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "end.")))
          (dovecote-submit "scripted"
                           (lambda (region)
                             (setq text region)
                             (list :messages (vector (list :role "user"
                                                           :content region))))
                           :buffer (current-buffer) :start start :end end
                           :callback (lambda (result) (setq shown result))))
        (should (equal text "#delay 0.3\nTeh end."))
        (goto-char (point-min))
        (insert "🐣 ")
        (should (= (dovecote-pending-count) 1))
        (dovecote-test--wait-until shown)
        (should (zerop (dovecote-pending-count)))
        (should (equal (buffer-string) "🐣 Intro.\nThe end."))
        (let ((command (plist-get shown :command)))
          (should (equal (plist-get command :state) "done"))
          (should (null (plist-get command :flowId))))
        (should (null (dovecote-test--flows)))))))

(ert-deftest dovecote-test-human-ask-is-answered ()
  "A question to a person is answered through the answer function."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "Subject: lunch\nwhere shal we eat?\n")
      (let* ((asked nil)
             (dovecote-adapter "human")
             (dovecote-human-answer-function
              (lambda (question params)
                (setq asked (cons question params))
                "Where shall we eat?")))
        (pcase-let ((`(,start . ,end) (dovecote-test--region "where" "?")))
          (dovecote-correct-region start end))
        (dovecote-test--wait-until asked)
        (should (string-match-p (regexp-quote dovecote-correction-instruction)
                                (car asked)))
        (should (string-match-p "where shal we eat\\?" (car asked)))
        (should (stringp (plist-get (cdr asked) :commandId)))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should (equal (buffer-string) "Subject: lunch\nWhere shall we eat?\n"))))))

;;;; Issue 14: the person's text is never corrupted

(defun dovecote-test--conflict-buffer ()
  "Return the conflict buffer once one is open."
  (dovecote-test--wait-until
    (cl-find-if (lambda (buffer)
                  (string-prefix-p "*dovecote conflict " (buffer-name buffer)))
                (buffer-list))))

(defun dovecote-test--resolve-with-model (conflicts)
  "In the buffer CONFLICTS keep the model's side of each block and send it."
  (with-current-buffer conflicts
    (goto-char (point-min))
    (while (ignore-errors (smerge-next) t)
      (smerge-keep-lower))
    (dovecote-conflict-finish))
  (dovecote-test--wait-until (not (buffer-live-p conflicts))))

(ert-deftest dovecote-test-resolve-after-editing-the-word-again ()
  "Finding 1: a conflict resolved after the word was edited again.
The person's newer word stays; the model's is not written beside it
\(was: \"chillyweird\"), and the message says why."
  (dolist (retype (list (lambda () (dovecote-test--replace "odd" "chilly"))
                        (lambda ()
                          (goto-char (point-min))
                          (search-forward "odd")
                          (delete-region (match-beginning 0) (point))
                          (dolist (char (string-to-list "chilly"))
                            (insert char)))))
    (dovecote-test--with-server
      (with-current-buffer
          (dovecote-test--buffer "#delay 0.5\nTeh garden is wierd in winter.")
        (dovecote-correct-region (point-min) (point-max))
        (dovecote-test--replace "wierd" "odd")
        (let ((conflicts (dovecote-test--conflict-buffer)))
          (dovecote-test--wait-until (zerop (dovecote-pending-count)))
          (should (equal (buffer-string) "The garden is odd in winter."))
          (funcall retype)
          (dovecote-test--resolve-with-model conflicts))
        (should (equal (buffer-string) "The garden is chilly in winter."))
        (should (dovecote-test--said "kept your newer text"))))))

(ert-deftest dovecote-test-two-calls-on-the-same-region ()
  "Finding 2: asking twice on one region gives the text once, no conflict.
The first reply fixes \"Teh\" at the region's start; the second call's
region keeps the fixed word (was: \"TheThe garden\" and a conflict
whose \"yours\" side was empty)."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer "#delay 0.3\nTeh garden is wierd in winter.")
      (dovecote-correct-region (point-min) (point-max))
      (dovecote-correct-region (point-min) (point-max))
      (should (equal (dovecote-test--lighter) " Dove:2"))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (dovecote-test--wait-until (null (dovecote-test--flows "running" "waiting")))
      (accept-process-output nil 0.3)
      (should (equal (buffer-string) "The garden is weird in winter."))
      (should-not (cl-find-if (lambda (buffer)
                                (string-prefix-p "*dovecote conflict "
                                                 (buffer-name buffer)))
                              (buffer-list))))))

(defun dovecote-test--type-key (char)
  "Type CHAR at point as the command loop does it.
`self-insert-command' amalgamates with the keys before it, and the
end of the command adds its undo boundary."
  (let ((this-command 'self-insert-command)
        (last-command-event char))
    (self-insert-command 1 char)
    (undo-auto--add-boundary))
  (setq last-command 'self-insert-command))

(defun dovecote-test--undo-states ()
  "Undo the current buffer's history one unit at a time; return the texts.
The first is the text now, each next one the text after one more undo."
  (let ((pending buffer-undo-list)
        (states (list (buffer-string))))
    (while (and pending (listp pending))
      (while (and pending (null (car pending))) (pop pending))
      (when pending
        (setq pending (primitive-undo 1 pending))
        (push (buffer-string) states)))
    (nreverse states)))

(ert-deftest dovecote-test-applied-edit-is-one-undo-unit ()
  "Finding 3: a reply landing mid-typing is an undo unit of its own.
One undo takes back what was typed after it, the next exactly the
model's edit, never the letters typed around it."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 0.4\nTeh end.\n\nNotes: ")
      (let ((last-command nil))
        (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "end.")))
          (dovecote-correct-region start end))
        (goto-char (point-max))
        (setq buffer-undo-list nil)
        (while (string-prefix-p "#delay" (buffer-string))
          (dovecote-test--type-key ?a)
          (accept-process-output nil 0.05))
        (let ((landed (buffer-string)))
          (dotimes (_ 3) (dovecote-test--type-key ?b))
          (let ((states (dovecote-test--undo-states)))
            (should (string-prefix-p "The end.\n\nNotes: a" (nth 0 states)))
            (should (string-suffix-p "bbb" (nth 0 states)))
            ;; First undo: the three keys typed after the edit, nothing else.
            (should (equal (nth 1 states) landed))
            ;; Second undo: the model's edit alone, the letters stay.
            (should (equal (nth 2 states)
                           (concat "#delay 0.4\nTeh end.\n\nNotes: "
                                   (substring landed (length "The end.\n\nNotes: ")))))))))))

(ert-deftest dovecote-test-markers-are-whole-lines-and-smerge ()
  "Finding 4: markers write whole lines, turn smerge on, share the labels.
Keeping a side leaves the sentence on one line."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer "Notes\n#delay 0.3\nTeh garden is wierd in winter.\nEnd\n")
      (let ((dovecote-on-conflict "markers"))
        (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "winter.")))
          (dovecote-correct-region start end))
        (dovecote-test--replace "wierd" "odd")
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (dovecote-test--wait-until smerge-mode)
        (should (equal (buffer-string)
                       (concat "Notes\n<<<<<<< yours\n"
                               "The garden is odd in winter.\n"
                               "||||||| original\n"
                               "The garden is wierd in winter.\n=======\n"
                               "The garden is weird in winter.\n"
                               ">>>>>>> model\nEnd\n")))
        (goto-char (point-min))
        (smerge-next)
        (smerge-keep-lower)
        (should (equal (buffer-string)
                       "Notes\nThe garden is weird in winter.\nEnd\n"))))))

(ert-deftest dovecote-test-cancel-at-point-and-in-buffer ()
  "Finding 5: `dovecote-cancel' cancels the call at point, or all.
The text stays, the highlight goes, the mode line says none pending."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer "#hang\nTeh one.\n\n#hang\nTeh two.\n\n#hang\nTeh three.\n")
      (let ((text (buffer-string)))
        (dolist (word '("one." "two." "three."))
          (goto-char (point-min))
          (let* ((end (search-forward word))
                 (start (search-backward "#hang")))
            (dovecote-correct-region start end)))
        (dovecote-test--wait-until (= (hash-table-count dovecote--flows) 3))
        (dovecote-test--wait-until (= dovecote--expected 0))
        (goto-char (point-min))
        (search-forward "one")
        (should (= (length (dovecote-cancel)) 1))
        (dovecote-test--wait-until (= (dovecote-pending-count) 2))
        (should (equal (dovecote-test--lighter) " Dove:2"))
        (should (dovecote-test--said "correction .* was cancelled"))
        (should (= (length (dovecote-cancel t)) 2))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should (equal (dovecote-test--lighter) " Dove"))
        (should (null (overlays-in (point-min) (point-max))))
        (should (equal (buffer-string) text))
        (should (equal (mapcar (lambda (f) (plist-get f :state)) (dovecote-test--flows))
                       '("cancelled" "cancelled" "cancelled")))
        (goto-char (point-min))
        (should-error (dovecote-cancel) :type 'user-error)))))

(ert-deftest dovecote-test-list-of-calls ()
  "Finding 5: a list of this Emacs' calls; RET shows one, k cancels, r replays."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 0.2\nTeh done.\n\n#hang\nTeh hung.\n")
      (pcase-let ((`(,start . ,end) (dovecote-test--region "#delay" "done.")))
        (dovecote-correct-region start end))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (pcase-let ((`(,start . ,end) (dovecote-test--region "#hang" "hung.")))
        (dovecote-correct-region start end))
      ;; Its step is out and the flow waits on it (its flow/state may come
      ;; after the step's command/state).
      (dovecote-test--wait-until
        (cl-some (lambda (info) (and (plist-get info :command)
                                     (equal (plist-get info :state) "waiting")))
                 (hash-table-values dovecote--flows)))
      (let ((source (current-buffer)))
        (with-current-buffer (dovecote-list-commands)
          (should (derived-mode-p 'dovecote-calls-mode))
          (should (= (length tabulated-list-entries) 2))
          ;; Newest first: the hanging one, then the one done.
          (goto-char (point-min))
          (let ((line (buffer-substring (line-beginning-position) (line-end-position))))
            (should (string-match-p
                     (concat "\\` [0-9a-f]\\{8\\} +waiting +[0-9]+s +"
                             (regexp-quote (buffer-name source))
                             " +#hang +scripted$")
                     line)))
          (forward-line 1)
          (should (string-match-p " completed " (thing-at-point 'line t)))
          (let ((shown (call-interactively (key-binding (kbd "RET")))))
            (with-current-buffer shown
              (should (string-match-p "^Call +[0-9a-f-]\\{36\\}$" (buffer-string)))
              (should (string-match-p "^Journal:" (buffer-string)))
              (should (string-match-p "pending +-> sent" (buffer-string)))
              (should (string-match-p "^Reply:\n  The done\\." (buffer-string)))))
          (goto-char (point-min))
          (call-interactively (key-binding "k"))
          (dovecote-test--wait-until (zerop (hash-table-count dovecote--flows)))
          (dovecote-test--wait-until
            (progn (accept-process-output nil 0.15)
                   (goto-char (point-min))
                   (string-match-p " cancelled " (thing-at-point 'line t)))))
        (should (equal (buffer-string) "The done.\n\n#hang\nTeh hung.\n"))
        ;; A dead one replays from the list.
        (erase-buffer)
        (insert "#delay 0.6\nTeh late.")
        (let ((dead (dovecote-test--correct-until-dead)))
          (with-current-buffer (dovecote-list-commands)
            (goto-char (point-min))
            (should (string-match-p " stalled " (thing-at-point 'line t)))
            (let ((dovecote-replay-timeout 10))
              (call-interactively (key-binding "r")))
            (should (dovecote-test--said (concat "replayed " (substring dead -8)))))
          (dovecote-test--wait-until (zerop (dovecote-pending-count)))
          (should (equal (buffer-string) "The late.")))))))

(ert-deftest dovecote-test-reopen-a-closed-conflict-buffer ()
  "Finding 5: a conflict buffer closed without resolving opens again."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 0.3\nTeh plan is wierd.")
      (dovecote-correct-region (point-min) (point-max))
      (dovecote-test--replace "wierd" "odd")
      (let ((conflicts (dovecote-test--conflict-buffer)))
        (with-current-buffer conflicts
          (call-interactively (key-binding (kbd "C-c C-k"))))
        (should-not (buffer-live-p conflicts)))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (dovecote-reopen-conflict)
      (let ((conflicts (dovecote-test--conflict-buffer)))
        (with-current-buffer conflicts
          (should (string-match-p "^line 1: The plan is odd\\.$" (buffer-string))))
        (dovecote-test--resolve-with-model conflicts))
      (should (equal (buffer-string) "The plan is weird.")))))

(ert-deftest dovecote-test-correct-uses-active-region-else-paragraph ()
  "Finding 6: no active region means the paragraph at point.
A region left inactive (the mark set earlier) is never used."
  (dovecote-test--with-server
    (with-current-buffer
        (dovecote-test--buffer "Notes\n\n#delay 0.2\nTeh first.\n\n#delay 0.2\nTeh second.\n")
      (transient-mark-mode 1)
      (set-mark (point-min))
      (deactivate-mark)
      (goto-char (point-min))
      (search-forward "first")
      (call-interactively #'dovecote-correct-region)
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (equal (buffer-string) "Notes\n\nThe first.\n\n#delay 0.2\nTeh second.\n"))
      ;; With an active region, the region.
      (goto-char (point-min))
      (search-forward "#delay")
      (set-mark (match-beginning 0))
      (goto-char (point-max))
      (activate-mark)
      (call-interactively #'dovecote-correct-region)
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (should (equal (buffer-string) "Notes\n\nThe first.\n\nThe second.\n")))))

(ert-deftest dovecote-test-progress-and-messages ()
  "Finding 7: streamed text shows at the region; landing says so."
  (dovecote-test--with-server
    (with-current-buffer (dovecote-test--buffer "#delay 0.5\nTeh garden.")
      (call-interactively #'dovecote-correct-region)
      (should (dovecote-test--said "correction asked (1 pending)"))
      (let ((command (dovecote-test--wait-until
                       (cl-some (lambda (info) (plist-get info :command))
                                (hash-table-values dovecote--flows)))))
        (dovecote--handle-notification
         nil 'command/progress (list :commandId command :text "The gar"))
        (let ((overlay (car (overlays-in (point-min) (point-max)))))
          (should (string-match-p "The gar" (overlay-get overlay 'after-string)))))
      (dovecote-test--wait-until (zerop (dovecote-pending-count)))
      (dovecote-test--wait-until
        (dovecote-test--said "correction landed in \\*dovecote-test\\*"))
      (should (string-match-p "landed" (car dovecote-test--messages)))
      ;; A call that dies says so too.
      (erase-buffer)
      (insert "#hang\nTeh.")
      (dovecote-test--correct-until-dead)
      (dovecote-test--wait-until (dovecote-test--said "stalled: its call [0-9a-f]\\{8\\} is dead")))))

(ert-deftest dovecote-test-command-map-and-menu ()
  "Finding 8: a prefix map with the commands, and a menu."
  (should (keymapp dovecote-command-map))
  (should (eq (lookup-key dovecote-command-map "c") #'dovecote-correct-region))
  (should (eq (lookup-key dovecote-command-map "k") #'dovecote-cancel))
  (should (eq (lookup-key dovecote-command-map "l") #'dovecote-list-commands))
  (should (eq (lookup-key dovecote-command-map "d") #'dovecote-list-dead-letters))
  (should (eq (lookup-key dovecote-command-map "o") #'dovecote-reopen-conflict))
  (should (keymapp (lookup-key dovecote-mode-map [menu-bar Dove])))
  (dolist (name '(dovecote-mode dovecote-correct-region dovecote-cancel
                  dovecote-list-commands dovecote-list-dead-letters))
    (should (commandp name)))
  (should (fboundp 'dovecote-pending-count))
  (should (boundp 'dovecote-server-command))
  (should (boundp 'dovecote-default-timeout)))

(ert-deftest dovecote-test-set-up-guard-and-failure-once ()
  "Finding 9: the mode only where meant; a failure to start said once.
Temporary buffers in `text-mode' start nothing; a file buffer does,
without waiting for the server; a wrong server is reported once."
  (dovecote-test--with-server
    (let ((text-mode-hook (list #'dovecote-turn-on)))
      (dotimes (_ 20)
        (with-temp-buffer (text-mode) (should-not dovecote-mode)))
      (should-not dovecote--connecting)
      (should-not (dovecote--live))
      (let ((file (expand-file-name "notes.txt" dovecote-test--directory)))
        (with-current-buffer (find-file-noselect file)
          (rename-buffer "*dovecote-test file*")
          (should dovecote-mode)
          ;; Started, not waited for: the buffer opens when it answers.
          (should dovecote--connecting)
          (should-not (dovecote--opened-p))
          (dovecote-test--wait-until (dovecote--opened-p))))))
  (dovecote-test--with-server
    (let ((dovecote-server-command '("/nonexistent/dovecote" "serve" "--stdio")))
      (dotimes (i 3)
        (with-current-buffer (generate-new-buffer (format "*dovecote-test %d*" i))
          (dovecote-mode 1)
          (should dovecote-mode)))
      (should (= (length (dovecote-test--said "cannot start the server")) 1))
      (should (string-suffix-p "!" (with-current-buffer "*dovecote-test 0*"
                                     (dovecote-test--lighter))))
      ;; A command that needs the server says why, each time.
      (with-current-buffer "*dovecote-test 0*"
        (insert "Teh.")
        (should-error (dovecote-correct-region (point-min) (point-max))
                      :type 'user-error)))))

(ert-deftest dovecote-test-cli-sees-the-calls-of-emacs ()
  "Finding 9: the CLI in the project finds the database Emacs' server uses."
  (let* ((project (make-temp-file "dovecote-project-" t))
         (sub (expand-file-name "notes/" project))
         (process-environment
          (append (list (concat "XDG_DATA_HOME=" (expand-file-name "data" project)))
                  (cl-remove-if (lambda (v) (string-prefix-p "DOVECOTE_DB=" v))
                                process-environment))))
    (make-directory (expand-file-name ".dovecote" project))
    (make-directory sub)
    (unwind-protect
        (dovecote-test--with-server
          (let ((dovecote-server-command
                 (list dovecote-test--executable "serve" "--stdio")))
            (with-current-buffer (find-file-noselect (expand-file-name "a.txt" sub))
              (rename-buffer "*dovecote-test a.txt*")
              (dovecote-mode 1)
              (dovecote-test--wait-until (dovecote--opened-p))
              (insert "#hang\nTeh.")
              (let ((dead (dovecote-test--correct-until-dead))
                    (default-directory sub))
                (with-temp-buffer
                  (should (zerop (call-process dovecote-test--executable nil t nil
                                               "dead" "--json")))
                  (should (string-match-p (regexp-quote dead) (buffer-string))))))))
      (delete-directory project t))))

;;;; Issue 18: what the person kept is journaled when the file is saved

(defun dovecote-test--final-texts ()
  "Return the details of every `final_text' event the server journaled."
  (let (found)
    (dolist (command (append (plist-get (jsonrpc-request (dovecote--live)
                                                         'command/list nil)
                                        :commands)
                             nil))
      (dolist (event (append (plist-get (jsonrpc-request
                                         (dovecote--live) 'command/show
                                         (list :commandId (plist-get command :id)))
                                        :events)
                             nil))
        (when (equal (plist-get event :event) "final_text")
          (push (plist-get event :detail) found))))
    found))

(ert-deftest dovecote-test-save-records-the-final-text ()
  "Saving a corrected file journals what the person kept of the region.
The save sends document/save; the region's text then is the call's
`final_text' event."
  (dovecote-test--with-server
    (let ((file (expand-file-name "kept.txt" dovecote-test--directory)))
      (with-temp-file file (insert "Teh garden is wierd.\n"))
      (with-current-buffer (find-file-noselect file)
        (rename-buffer "*dovecote-test kept*")
        (dovecote-mode 1)
        (dovecote-test--wait-until (dovecote--opened-p))
        (dovecote-correct-region (point-min) (point-max))
        (dovecote-test--wait-until (equal (buffer-string) "The garden is weird.\n"))
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (should-not (dovecote-test--final-texts))
        (dovecote-test--replace "garden" "yard")
        (save-buffer)
        (should (equal (dovecote-test--wait-until (dovecote-test--final-texts))
                       '((:text "The yard is weird.\n"))))))))

;;;; Issue 14: the invariant through kill and reopen, and revert

(ert-deftest dovecote-test-kill-and-reopen-while-pending ()
  "A file buffer killed while its correction is pending, then reopened.
The reply lands in the reopened buffer, merged with what the person
typed there since."
  (dovecote-test--with-server
    (let* ((file (expand-file-name "note.txt" dovecote-test--directory))
           (text "#delay 1\nTeh garden is wierd.\n"))
      (with-temp-file file (insert text))
      (with-current-buffer (find-file-noselect file)
        (dovecote-mode 1)
        (dovecote-test--wait-until (dovecote--opened-p))
        (dovecote-correct-region (point-min) (point-max))
        (dovecote-test--wait-until (zerop dovecote--expected))
        (kill-buffer))
      (with-current-buffer (find-file-noselect file)
        (rename-buffer "*dovecote-test note*")
        (dovecote-mode 1)
        (goto-char (point-max))
        (insert "P.S. ")
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (dovecote-test--wait-until (equal (buffer-string)
                                          "The garden is weird.\nP.S. "))
        (set-buffer-modified-p nil)))))

(ert-deftest dovecote-test-revert-while-pending ()
  "A buffer reverted while its correction is pending keeps the file's text.
The reply merges into the text as reverted: the words the person's
unsaved edit had changed are the file's again, and fixed."
  (dovecote-test--with-server
    (let* ((file (expand-file-name "note.txt" dovecote-test--directory))
           (text "#delay 1\nTeh garden is wierd.\n"))
      (with-temp-file file (insert text))
      (with-current-buffer (find-file-noselect file)
        (rename-buffer "*dovecote-test revert*")
        (dovecote-mode 1)
        (dovecote-test--wait-until (dovecote--opened-p))
        (dovecote-correct-region (point-min) (point-max))
        (dovecote-test--replace "garden" "yard")
        (revert-buffer t t t)
        (should dovecote-mode)
        (dovecote-test--wait-until (zerop (dovecote-pending-count)))
        (dovecote-test--wait-until (equal (buffer-string)
                                          "The garden is weird.\n"))
        (set-buffer-modified-p nil)))))

;;;; The randomized editing test

(defvar dovecote-test--fuzz-seed (or (getenv "DOVECOTE_FUZZ_SEED") "14")
  "The seed of the randomized editing test; `make fuzz' gives a new one.")

(defvar dovecote-test--fuzz-rounds
  (string-to-number (or (getenv "DOVECOTE_FUZZ_ROUNDS") "6"))
  "How many random scenes the randomized editing test plays.")

(defconst dovecote-test--fixes
  '(("wierd" . "weird") ("recieve" . "receive") ("beleive" . "believe")
    ("definately" . "definitely"))
  "The misspellings of the scripted model, and its fixes (of equal length).
None of the fixes can be made from pieces of the texts by deleting a
few characters, so that undoing the fixes gives the person's text.")

(defconst dovecote-test--words
  '("wierd" "recieve" "beleive" "definately" "garden" "winter" "alpha" "🦆"
    "ñandú" "lake")
  "The words of the random texts.")

(defconst dovecote-test--typed
  '("P" "Q" "xyz" " " "ü" "🌊" "\n")
  "What the person types: none of it a misspelling, a fix or a directive.")

(defun dovecote-test--pick (list)
  "Return a random element of LIST."
  (nth (random (length list)) list))

(defun dovecote-test--zones (&optional with-fixes)
  "Return the (START . END) zones of the buffer a person never edits.
Directive lines (the model removes them) and marker blocks, each with
the line start after it: positions from 0, END inclusive.  WITH-FIXES
adds the words the model fixed: the person's text is the buffer's with
the fixes undone, which an edit of a fixed word would not tell."
  (let (zones)
    (save-excursion
      (goto-char (point-min))
      (while (re-search-forward
              "^\\(#delay [0-9.]+\n\\|<<<<<<< yours\n\\(?:.*\n\\)*?>>>>>>> model\n\\)"
              nil t)
        (push (cons (1- (match-beginning 0)) (1- (match-end 0))) zones))
      (when with-fixes
        (goto-char (point-min))
        (while (re-search-forward (regexp-opt (mapcar #'cdr dovecote-test--fixes)) nil t)
          (push (cons (1- (match-beginning 0)) (1- (match-end 0))) zones))))
    zones))

(defun dovecote-test--normal ()
  "Return the buffer's text as the person alone would have it, and its map.
The value is (TEXT . MAP): directive lines out, each marker block as its
yours side, every fix of the model undone (fixes keep the length);
MAP is a vector from buffer offsets (from 0) to TEXT's offsets."
  (let* ((text (buffer-substring-no-properties (point-min) (point-max)))
         (map (make-vector (1+ (length text)) 0))
         (out nil) (pos 0) (at 0))
    (dolist (zone (sort (dovecote-test--zones) (lambda (a b) (< (car a) (car b)))))
      (while (< pos (car zone))
        (aset map pos at) (push (aref text pos) out) (cl-incf pos) (cl-incf at))
      (let* ((block (substring text (car zone) (cdr zone)))
             (yours (if (string-match "\\`<<<<<<< yours\n\\(\\(?:.*\n\\)*?\\)||||||| original\n"
                                      block)
                        ;; Your side as it was: a directive line in it is
                        ;; one the model's side dropped, yours kept.
                        (replace-regexp-in-string "^#delay [0-9.]+\n" ""
                                                  (match-string 1 block))
                      "")))
        (while (< pos (cdr zone)) (aset map pos at) (cl-incf pos))
        (dolist (char (string-to-list yours)) (push char out) (cl-incf at))))
    (while (< pos (length text))
      (aset map pos at) (push (aref text pos) out) (cl-incf pos) (cl-incf at))
    (aset map pos at)
    (let ((normal (concat (nreverse out))))
      (pcase-dolist (`(,wrong . ,right) dovecote-test--fixes)
        (setq normal (replace-regexp-in-string (regexp-quote right) wrong normal t t)))
      (cons normal map))))

(defun dovecote-test--free-p (from to)
  "Return non-nil if the person may edit the buffer offsets FROM..TO.
Never the last line end: a marker block at the end of a text without
one would add it."
  (and (< to (buffer-size))
       (cl-notany (lambda (zone) (and (<= from (cdr zone)) (>= to (car zone))))
                  (dovecote-test--zones t))))

(defun dovecote-test--highlights ()
  "Return the overlays that highlight pending work in the current buffer."
  (cl-remove-if-not (lambda (o) (memq (overlay-get o 'face)
                                      '(dovecote-pending dovecote-stalled)))
                    (overlays-in (point-min) (point-max))))

(defun dovecote-test--random-point ()
  "Return a random buffer offset (from 0), near a pending region's edge often."
  (let ((overlays (dovecote-test--highlights)))
    (if (and overlays (< (random 3) 2))
        (let ((o (dovecote-test--pick overlays)))
          (max 0 (min (buffer-size)
                      (+ (1- (dovecote-test--pick (list (overlay-start o) (overlay-end o))))
                         (- (random 5) 2)))))
      (random (1+ (buffer-size))))))

(defun dovecote-test--person-edit (person touched)
  "Make one random edit as a person would; return PERSON, their text, after it.
TOUCHED is a list whose car gets the highlights of the pending calls
whose region the edit meets."
  (let* ((from (dovecote-test--random-point))
         (to (min (buffer-size) (+ from (dovecote-test--pick '(0 0 1 2 4)))))
         (typed (if (and (> to from) (zerop (random 2)))
                    ""
                  (dovecote-test--pick dovecote-test--typed))))
    (if (not (dovecote-test--free-p from to))
        person
      (dolist (o (dovecote-test--highlights))
        (when (and (<= (1+ from) (overlay-end o)) (>= (1+ to) (overlay-start o)))
          (push o (car touched))))
      (let* ((map (cdr (dovecote-test--normal)))
             (nfrom (aref map from)) (nto (aref map to)))
        (setq person (concat (substring person 0 nfrom) typed (substring person nto))))
      (when (> to from)
        (let ((this-command 'kill-region))
          (delete-region (1+ from) (1+ to))
          (undo-auto--add-boundary))
        (setq last-command 'kill-region))
      (goto-char (1+ from))
      (dolist (char (string-to-list typed))
        (dovecote-test--type-key char))
      person)))

(defun dovecote-test--fuzz-text ()
  "Return a random text and where to correct it, a cons.
Its car is the text, its cdr 1 to 3 lists (START END POLICY)."
  (let* ((lines (cl-loop repeat (+ 3 (random 3))
                         collect (mapconcat (lambda (_) (dovecote-test--pick dovecote-test--words))
                                            (make-list (+ 2 (random 4)) nil) " ")))
         (starts (sort (cl-remove-duplicates
                        (cl-loop repeat (1+ (random 3)) collect (random (length lines))))
                       #'<))
         (text "") calls)
    (cl-loop for line in lines for n from 0
             do (when (memq n starts)
                  (push (list (length text) n) calls)
                  (setq text (concat text (format "#delay %.1f\n" (* 0.1 (1+ (random 8)))))))
             (setq text (concat text line "\n")))
    ;; Each call ends at the end of a random line at or after its start.
    (setq calls
          (mapcar (pcase-lambda (`(,start ,line))
                    (let* ((last (+ line (random (- (length lines) line))))
                           (end (with-temp-buffer
                                  (insert text)
                                  (goto-char (1+ start))
                                  (forward-line (1+ (- last line)))
                                  (1- (line-end-position)))))
                      (list start end (dovecote-test--pick '("drop" "ask" "markers")))))
                  calls))
    (cons text calls)))

(ert-deftest dovecote-test-randomized-editing ()
  "Random edits around pending calls keep the person's text exactly.
Insertions, deletions and replacements before, inside, across and
after one to three pending regions (overlapping ones too), replies
after random delays, policies drop, ask or markers.  After every call
has ended: the person's text is the buffer's with the model's edits
taken out; a call whose region was not edited merged cleanly; every
collision is reported (a conflict buffer with ask, markers with
markers); and each edit of the model is one undo unit.  The seed is
`dovecote-test--fuzz-seed'."
  (random dovecote-test--fuzz-seed)
  (dotimes (round dovecote-test--fuzz-rounds)
    (dovecote-test--with-server
      (pcase-let* ((`(,text . ,calls) (dovecote-test--fuzz-text))
                   (touched (list nil))
                   (applied nil)
                   (steps nil)
                   (dovecote-finished-functions
                    (list (lambda (id _state)
                            (push (cons id (gethash id dovecote--step-commands))
                                  steps))))
                   (record (lambda (apply edits)
                             (let ((before (buffer-string)))
                               (funcall apply edits)
                               (push (cons before (buffer-string)) applied))))
                   ;; Another call's edit in a region touches it too: two
                   ;; models may disagree (one keeps a directive line as
                   ;; text that the other removes).
                   (meet (lambda (params)
                           (when-let ((buffer (dovecote--buffer-of (plist-get params :uri))))
                             (with-current-buffer buffer
                               (let ((own (gethash (plist-get params :commandId)
                                                   dovecote--step-commands)))
                                 (dolist (edit (append (plist-get params :edits) nil))
                                   (dolist (o (dovecote-test--highlights))
                                     (when (and (not (equal (overlay-get o 'dovecote-id) own))
                                                (<= (1+ (plist-get edit :start)) (overlay-end o))
                                                (>= (1+ (plist-get edit :end)) (overlay-start o)))
                                       (push o (car touched))))))))))
                   (last-command nil))
        (advice-add 'dovecote--apply-edits :around record)
        (advice-add 'dovecote--apply-edit :before meet)
        (unwind-protect
            (with-current-buffer (dovecote-test--buffer text)
              ;; A typed newline is then only a newline, as the model of
              ;; the person's text has it.
              (electric-indent-local-mode -1)
              (setq buffer-undo-list nil)
              (let ((person (car (dovecote-test--normal))))
                (pcase-dolist (`(,start ,end ,policy) calls)
                  (let ((dovecote-on-conflict policy))
                    (dovecote-correct-region (1+ start) (1+ end))))
                (let ((deadline (+ (float-time) 1.2)))
                  (while (or (< (float-time) deadline) (> (dovecote-pending-count) 0))
                    (when (< (random 3) 2)
                      (let ((before (buffer-string)))
                        (setq person (dovecote-test--person-edit person touched))
                        ;; The test's own model of the person's text.
                        (unless (equal (car (dovecote-test--normal)) person)
                          (ert-fail (list "The test lost track of the person's edit"
                                          :seed dovecote-test--fuzz-seed :round round
                                          :before before :after (buffer-string)
                                          :person person)))))
                    (let ((before (buffer-string)))
                      (accept-process-output nil (* 0.01 (random 8)))
                      ;; Whatever lands meanwhile keeps the person's text.
                      (unless (equal (car (dovecote-test--normal)) person)
                        (ert-fail (list "A reply changed the person's text"
                                        :seed dovecote-test--fuzz-seed :round round
                                        :before before :after (buffer-string)
                                        :person person))))))
                (dovecote-test--wait-until (null (dovecote-test--flows "running" "waiting")))
                (accept-process-output nil 0.2)
                (let ((context (list :seed dovecote-test--fuzz-seed :round round
                                     :text text :calls calls :now (buffer-string))))
                  ;; The person's text, exactly: nothing lost, nothing doubled.
                  (should (equal (list context (car (dovecote-test--normal)))
                                 (list context person)))
                  ;; Every collision reported; no collision without an edit.
                  (pcase-dolist (`(,id . ,flow) steps)
                    (let* ((shown (jsonrpc-request (dovecote--live) 'command/show
                                                   (list :commandId id)))
                           (merge (plist-get shown :merge))
                           (conflicts (length (plist-get shown :conflicts))))
                      (pcase (plist-get merge :policy)
                        ("ask" (should (eq (> conflicts 0)
                                           (and (get-buffer (format "*dovecote conflict %s*" id))
                                                t))))
                        ("markers" (when (> conflicts 0)
                                     (should (string-match-p "^<<<<<<< yours$"
                                                             (buffer-string))))))
                      (unless (cl-find flow (car touched)
                                       :key (lambda (o) (overlay-get o 'dovecote-id))
                                       :test #'equal)
                        (should (equal (list context id conflicts)
                                       (list context id 0))))))
                  ;; Each model edit is one undo unit of its own.
                  (let ((states (dovecote-test--undo-states)))
                    (pcase-dolist (`(,before . ,after) applied)
                      (should (cl-loop for (a b) on states
                                       thereis (and (equal a after) (equal b before)))))))))
          (advice-remove 'dovecote--apply-edits record)
          (advice-remove 'dovecote--apply-edit meet))))))


(provide 'dovecote-tests)
;;; dovecote-tests.el ends here
