"""Using a trained policy: the HTTP service on Ray Serve (``app``, with its web page) and what it
shares with batch prediction (``answer``: one image in, one answer out)."""
