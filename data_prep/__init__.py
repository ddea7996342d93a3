"""Dataset preparation: TFDS (array_record) builders for CA-PF.

`capf-build-dataset NAME --manual_dir=DIR --data_dir=DIR` builds one of
`human36m`, `mpi_inf_3dhp`, `synthetic_human36m`; read the result with
`tfds.data_source(NAME, split=..., data_dir=DIR)`.
"""
