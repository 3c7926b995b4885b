"""Region jobs as Dask graphs: pure work functions (`kernels`), the graph builder (`graph`), the driver (`driver`)."""
