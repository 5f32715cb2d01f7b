"""pyembed: the embedding model as an enforced part of the schema."""
