"""What is blocked, and why: names (as rules compare them), the decision, list formats, fetching lists."""
