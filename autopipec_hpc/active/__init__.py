"""Active learning: score and select candidates, label them, and the loop that joins the steps."""
