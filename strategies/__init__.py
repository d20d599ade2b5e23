"""The built-in rank-search strategies, registered through the ``ranksearch.strategies``
entry points exactly as a third-party plugin would be."""
