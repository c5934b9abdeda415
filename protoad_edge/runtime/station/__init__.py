"""The line station: what a shift runs from, on top of ``protoad-run``'s loop (same sources, backend, outputs).

- ``database``: the SQLite schema (versioned, WAL) of every judgement, labels and the operators' actions;
- ``recorder``: the writer thread that fills it without slowing the judging thread;
- ``images``: the frames, masks and overlays kept on disk for it, within a bounded retention;
- ``live``: the newest overlay of each source, rendered only when the page asks;
- ``server``: the page and its JSON API (standard library HTTP server), token-checked beyond the loopback;
- ``review``: labels to the folders ``protoad-eval`` takes, and the threshold trade of the reviewed frames;
- ``station``: ties them to a run (``Station.lane_sinks``), and ``options`` are ``protoad-run``'s flags for it.
"""
