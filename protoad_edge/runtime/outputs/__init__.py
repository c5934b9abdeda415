"""Where verdicts go: overlay pictures, files (JSONL, video, masks), a window, MQTT."""
