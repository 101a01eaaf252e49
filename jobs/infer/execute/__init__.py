"""Execute: a plan's images through the per-batch stages (read and decode in CPU tasks, the
model in actors) into part files written by the workers, assembled and staged by shard."""
