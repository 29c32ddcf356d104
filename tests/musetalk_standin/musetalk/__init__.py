"""A stand-in for MuseTalk's `musetalk` package (TMElyralab/MuseTalk at 0a89dec), for tests:
the same shapes, dtypes, strides, batch order and call sites, without the models.
"""
