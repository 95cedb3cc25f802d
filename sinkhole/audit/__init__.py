"""What happened, provably: the writer (queue, batches, chain), the HMAC chains, shipping, the report."""
