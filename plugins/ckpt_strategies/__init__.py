"""Built-in atomicity strategies, registered through ckpt's ``register_strategies`` hook
exactly like third-party strategies."""
