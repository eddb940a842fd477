"""Developer environment: embedded Postgres and Redis, `credgate up` and the demo upstream."""
