"""Where frames come from: sources (cameras, streams, files, folders) and the capture thread that reads one."""
