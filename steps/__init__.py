"""Container-side step scripts: each file is one job's entry point; the folder is its source_dir."""
