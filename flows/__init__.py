"""Prefect flows composing the stages in ``tasks``: ordering, caching and retries live here."""
