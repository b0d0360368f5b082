"""Frames in and out of the capture loop: sources.py (camera, file, picture, URL, folder; the capture thread) and
sinks.py (window, video file, image folder, and the SinkThread writers), with stream.py (rtmp/srt/rtsp/udp through
FFmpeg), paced.py (a steady frame rate for stream outputs) and virtualcam.py."""
