"""`bcc watch`: classify every image that lands under a folder, for weeks, exactly once.

One thread does the work, in a loop: take the watchdog events off a queue, decide with the
`Settler` which files are complete, classify the ready ones in one `predict_paths` call (a
burst becomes batches), commit each outcome to the `Ledger`.  A second thread rewrites the
report from the ledger (`ReportWriter`), so neither a slow workbook nor one open in Excel holds
up classification.  The observer's own threads only put events on the queue.

The ledger is the truth; everything else is rebuilt from it.  On start (and after the
observer had to be restarted, and every `RESCAN_EVERY` seconds against lost events) ROOT is
reconciled with it: new or changed files are queued, files gone are marked vanished, files
whose size and mtime match their row are left alone.

`bcc watch` and the desktop app's "Watch this folder" start a watch the same way:
`claim_watch` (check the folders, take the locks of ROOT and the state) before any model is loaded, then
`make_watcher` (the Run sheet, the ledger) and `Watcher.run` on a thread of their own.

Modules: `site` (the folders, the locks of ROOT and the state, the log file), `watcher` (the work
loop), `engine` (what it needs of a classifier), `report_writer`, `ledger` (the SQLite truth) and
`settle` (when a file is complete).
"""
