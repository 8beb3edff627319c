"""The official DELF releases (TensorFlow): reading their files and converting them into this project's."""
