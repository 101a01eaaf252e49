"""Plan: what this run has to do. The input listing (prefixes, list files, S3 Inventory), the
committed state as a table by hash bucket of the URI, and the plan: the listing joined with
the state bucket by bucket, cut into content-defined shards."""
