-- Every corpus's partition of pyembed.vectors brought up to date with the functions above
-- (privileges, triggers, guard constraint); after 090, whose search_path the guard needs. And
-- every corpus's own vector leg for each of its keys made again from the template in force
-- (pyembed._nearest_functions, 025-nearest.sql), after 080's grants and 090's pinning, which
-- these functions take no part in; those of a corpus that is gone are dropped.
DO $partitions$
DECLARE
  c integer;
BEGIN
  FOR c IN SELECT corpus_id FROM pyembed.corpora ORDER BY corpus_id LOOP
    PERFORM pyembed._vector_partition(c);
  END LOOP;
  FOR c IN SELECT corpus_id FROM pyembed.corpora
           UNION
           SELECT substring(p.proname FROM '^_nearest_c([0-9]+)_')::integer
             FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pyembed'::regnamespace
              AND p.proname ~ '^_nearest_c[0-9]+_[0-9a-f]{32}$'
           ORDER BY 1 LOOP
    PERFORM pyembed._nearest_functions(c);
  END LOOP;
END
$partitions$;
