"""One model replica: the query engine, its optimizer update and the replay of a step's gradient."""
