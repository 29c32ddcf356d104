"""Stand-ins for MuseTalk's helpers: batching (datagen), model loading, face boxes and blending.
Same names and call shapes as MuseTalk's musetalk/utils/*.py."""
