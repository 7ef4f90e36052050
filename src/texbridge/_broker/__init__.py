"""The broker: a pure registry (`registry`) under a thin IO server (`server`), plus how clients find and start it
(`launch`). One broker per namespace, like one wineserver per Wine prefix."""
