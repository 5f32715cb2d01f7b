-- Every corpus's partition of pyembed.vectors brought up to date with the functions above
-- (privileges, triggers, guard constraint); after 090, whose search_path the guard needs. And
-- every corpus's own vector leg for each of its keys made again from the template in force
-- (pyembed._nearest_functions, 025-nearest.sql), after 080's grants and 090's pinning, which
-- these functions take no part in; those of a corpus that is gone are dropped.
DO $partitions$
DECLARE
  c integer;
  part name;
BEGIN
  FOR c IN SELECT corpus_id FROM pyembed.corpora ORDER BY corpus_id LOOP
    PERFORM pyembed._vector_partition(c);
  END LOOP;
  -- The partitions of corpora dropped since the last install (pyembed.drop_corpus empties them
  -- and leaves them: a drop's lock on the parent waited for every tenant's writes and reads).
  FOR part IN SELECT cl.relname
                FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class cl ON cl.oid = i.inhrelid
               WHERE i.inhparent = 'pyembed.vectors'::regclass
                 AND cl.relname ~ '^dropped_vectors_c[0-9]+$'
               ORDER BY 1 LOOP
    EXECUTE format('DROP TABLE pyembed.%I', part);
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
