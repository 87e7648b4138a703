"""Engine backends, one file each, behind the Engine protocol of `base.py`."""
