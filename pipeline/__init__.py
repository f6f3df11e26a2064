"""Language-guided few-shot segmentation with CLIP priors: the library (maths, no file layout)."""
