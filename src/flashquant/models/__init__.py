"""Model implementations written on flashquant's ops."""
