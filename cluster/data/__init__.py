"""Datasets on storage: ingest sources into content-addressed generations, read them back."""
