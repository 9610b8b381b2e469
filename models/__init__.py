"""Where the shipped model files are installed (package data), so the commands find them with no flag."""
