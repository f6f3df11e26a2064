"""The embedded benchmark's tiny CLIP: its towers, training on the caption corpus, its
evaluation and the shipped fixture. Real runs never import it."""
