;;; dovecote-model-tests.el --- ERT test of dovecote.el on a real model  -*- lexical-binding: t; -*-

;; Copyright (C) 2025 The dovecote authors

;; This file is not part of GNU Emacs.

;;; Commentary:

;; One end-to-end test with a real model: `dovecote serve --stdio' runs
;; with a dovecote.toml whose adapter is of kind llamacpp, so the server
;; starts llama.cpp's own server for SmolLM2-135M (installed by `make
;; model') and the correction of a region comes from that model, merged
;; while the person types.  Run it with `make emacs-test', or by hand:
;;
;;   DOVECOTE=$PWD/.venv/bin/dovecote $EMACS --batch -Q \
;;     -L editor_bridge/emacs -l dovecote-model-tests \
;;     -f ert-run-tests-batch-and-exit

;;; Code:

(require 'ert)
(require 'dovecote)

(defvar dovecote-model-test-executable (or (getenv "DOVECOTE") "dovecote")
  "The dovecote executable the test starts.")

(defun dovecote-model-test-wait (predicate seconds)
  "Wait until PREDICATE gives non-nil, at most SECONDS; fail if it never does."
  (let ((deadline (+ (float-time) seconds)))
    (while (and (not (funcall predicate)) (< (float-time) deadline))
      (accept-process-output nil 0.05))
    (should (funcall predicate))))

(ert-deftest dovecote-model-test-correct-a-region ()
  "SmolLM2 corrects a region through llama.cpp while the person types."
  (let* ((directory (make-temp-file "dovecote-model-test-" t))
         (config (expand-file-name "dovecote.toml" directory))
         (process-environment
          (cons (concat "XDG_STATE_HOME=" (expand-file-name "state" directory))
                process-environment))
         (dovecote-server-command
          (list dovecote-model-test-executable "serve" "--stdio"
                "--db" (expand-file-name "test.db" directory)
                "--config" config))
         (dovecote-adapter "mine")
         (dovecote-on-conflict "drop")
         (dovecote-default-timeout 60)
         (finished nil)
         (dovecote-finished-functions
          (list (lambda (_id state) (setq finished state))))
         (buffer (generate-new-buffer "*dovecote-model-test*")))
    (with-temp-file config
      (insert "[adapters.mine]\nkind = \"llamacpp\"\nn_ctx = 1024\n"))
    (unwind-protect
        (with-current-buffer buffer
          (insert "Notes:\nTeh cat sat on teh mat.\nEnd.")
          (dovecote-mode 1)
          (goto-char (point-min))
          (let ((start (progn (search-forward "Teh") (match-beginning 0)))
                (end (progn (search-forward "mat.") (point))))
            (dovecote-correct-region start end))
          ;; While the model's server starts and the model thinks, type
          ;; after the region, inside it and before it.
          (goto-char (point-max))
          (insert " Bye.")
          (goto-char (point-min))
          (search-forward "sat")
          (replace-match "lay" t t)
          (goto-char (point-min))
          (insert "My ")
          (dovecote-model-test-wait
           (lambda () (and finished (zerop (dovecote-pending-count)))) 90)
          (should (equal finished "done"))
          (should (equal (buffer-string)
                         "My Notes:\nThe cat lay on the mat.\nEnd. Bye."))
          ;; llama.cpp's own output went to its log, never to the editor.
          (let ((stderr (get-buffer "*dovecote stderr*")))
            (should-not (and stderr
                             (with-current-buffer stderr
                               (string-match-p "load_model" (buffer-string))))))
          (should (with-temp-buffer
                    (insert-file-contents
                     (expand-file-name "state/dovecote/llamacpp-mine.log"
                                       directory))
                    (string-match-p "load_model" (buffer-string)))))
      (dovecote-shutdown)
      (with-current-buffer buffer (set-buffer-modified-p nil))
      (kill-buffer buffer)
      (delete-directory directory t))))

(provide 'dovecote-model-tests)

;;; dovecote-model-tests.el ends here
