"""cluster: everything that touches Ray or storage."""
