"""What every layer runs on: the mesh, safe files, the console, device profiles."""
