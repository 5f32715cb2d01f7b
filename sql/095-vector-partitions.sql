-- Every corpus's partition of pyembed.vectors brought up to date with the functions above
-- (privileges, triggers, guard constraint); after 090, whose search_path the guard needs.
DO $partitions$
DECLARE
  c integer;
BEGIN
  FOR c IN SELECT corpus_id FROM pyembed.corpora ORDER BY corpus_id LOOP
    PERFORM pyembed._vector_partition(c);
  END LOOP;
END
$partitions$;
