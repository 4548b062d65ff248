"""Side-by-side measurements; each module says how to run it and what it writes."""
