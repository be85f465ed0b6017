"""The site app's pages, one small module each; every page is a thin view over the core."""
