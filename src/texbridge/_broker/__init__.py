"""The broker: a pure registry (`registry`) under a thin IO server (`server`), the fd store (`fdstore`, `_keeper`)
and the daemon (`daemon`). One broker per namespace, like one wineserver per Wine prefix; how clients find and start
it is client-side (`texbridge._launch`)."""
