"""dcfx: DeepCache as a compiled graph pass."""
