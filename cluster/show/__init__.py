"""What a user looks at: `vaegen ls` (inventory), `vaegen show` (galleries), `vaegen evaluate`."""
