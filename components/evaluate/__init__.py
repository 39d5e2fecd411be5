"""Evaluation: batched generation on the held-out split for base, candidate(s) and champion; metrics; gate."""
