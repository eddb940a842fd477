"""The admin API's request handlers, one module per resource; shared request helpers live in common."""
