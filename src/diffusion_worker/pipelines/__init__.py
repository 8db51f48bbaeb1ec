"""One module per pipeline family; each loads once from the models folder and runs one request at a time."""
