"""Frames in and out of the capture loop: sources (camera, file, URL, folder; the capture thread) and sinks (window,
video file, image folder; writer threads)."""
