"""Variants of pyembed.search that keep the vector leg's plan across transactions, for counting
(count_search.py --setup FILE --paths pyembed,fn:pyembed.search_g2) and timing
(bench_suite.py --search-only --database guard --pyembed-function pyembed.search_g2) beside it.

Each is made from this checkout's sql/030-search.sql (pyembed._vector_ranking and pyembed.search,
renamed with a suffix), with the vector leg (the call of the corpus's own function, built from g2:
pyembed._nearest_functions, or the dynamic statement without it) replaced; nothing else changes,
so that a count's difference is the variant's alone. Written for bench_suite's corpus (its id, key
and dimensions given): the variants are measurements, not code to ship (docs/index-tuning.md, "The
guard's cost", says what each lacks).
  pu  the statement PREPAREd once per session under the md5 of its text and run by a utility
      EXECUTE (the query vector as a literal: a utility EXECUTE takes no parameter from PL/pgSQL);
      a missing statement found by its error. Unsafe: a client may PREPARE that name first.
  pv  pu, with the statement under the name checked against pg_prepared_statements first.
  pl  the current dynamic statement with the vector passed as text (what the literal costs).
  g1  the corpus's statement written into the ranking's body, static: PL/pgSQL keeps its plan.
  g2  that statement in a function of its own (pyembed._nearest_cN), called by name.
Usage: .venv/bin/python tests/benchmarks/guard_variants.py --corpus-id 1 > /tmp/variants.sql
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import REPO

KEY = "fake/fake-hash@1:384"

# The vector leg in the ranking: the corpus's own function (pyembed._nearest_functions), or the
# dynamic statement when it is missing; each variant replaces both.
EXECUTE = """        IF leg IS NULL THEN
          EXECUTE pyembed._nearest_sql(c.corpus_id, query_model_key, n, filter IS NOT NULL, false,
                                       s, md.distance, md.counted)
            INTO hit_ids, hit_distances, hit_scores, hit_docs USING query_embedding, filter;
        ELSE
          EXECUTE leg INTO hit_ids, hit_distances, hit_scores, hit_docs
            USING query_embedding, filter, n, pyembed._nearest_candidates(n, s),
                  pyembed._nearest_scans(n, false, s, md.counted);
        END IF;
"""

NAMED = """      stmt := pyembed._nearest_sql(c.corpus_id, query_model_key, n, filter IS NOT NULL, false, s,
                                   md.distance, md.counted);
      pname := 'pyembed_' || md5(stmt);
"""

RUN = """      EXECUTE format('EXECUTE %I(%L, %L)', pname, query_embedding, filter)
        INTO hit_ids, hit_distances, hit_scores, hit_docs;
"""

PREPARE = "EXECUTE format('PREPARE %I(vector, jsonb) AS %s', pname, stmt);\n"


def static(into: str, query: str, corpus_id: int, key: str, dims: int) -> str:
    """The unfiltered vector-storage cosine statement of _nearest_sql, its parts as literals."""
    quoted = key.replace("'", "''")
    return (f"SELECT array_agg(chunk_id), array_agg(distance), array_agg(1 - distance), "
            f"array_agg(doc_no)\n        INTO {into}\n        FROM (SELECT * FROM (SELECT "
            f"v.chunk_id, v.doc_no, (v.embedding::vector({dims})) <=> {query}::vector({dims}) "
            f"AS distance\n                FROM pyembed.vectors_c{corpus_id} v WHERE v.model_key "
            f"= '{quoted}'\n               ORDER BY 3 LIMIT n) hit ORDER BY distance, chunk_id) "
            "hit;\n")


def variants(corpus_id: int, key: str, dims: int) -> str:
    src = (REPO / "sql" / "030-search.sql").read_text()
    ranking = src[src.index("CREATE OR REPLACE FUNCTION pyembed._vector_ranking("):
                  src.index("-- The hits of the k best")]
    search = src[src.index("CREATE OR REPLACE FUNCTION pyembed.search("):]
    assert EXECUTE in ranking, "the vector leg's EXECUTE changed: update guard_variants.py"
    indent = RUN.replace("      ", "        ")
    legs = {
        "pu": NAMED + "      BEGIN\n" + indent + "      EXCEPTION WHEN invalid_sql_statement_name "
              "THEN\n        " + PREPARE + indent + "      END;\n",
        "pv": NAMED + "      IF NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements p WHERE "
              "p.name = pname\n          AND p.statement = format('PREPARE %I(vector, jsonb) AS "
              "%s', pname, stmt)) THEN\n        IF EXISTS (SELECT FROM "
              "pg_catalog.pg_prepared_statements p WHERE p.name = pname) THEN\n          EXECUTE "
              "format('DEALLOCATE %I', pname);\n        END IF;\n        " + PREPARE
              + "      END IF;\n" + RUN,
        "pl": EXECUTE.split("        ELSE\n")[0].replace("        IF leg IS NULL THEN\n", "").replace(
            "USING query_embedding,", "USING query_embedding::text::vector,"),
        "g1": "      " + static("hit_ids, hit_distances, hit_scores, hit_docs", "query_embedding",
                                corpus_id, key, dims),
        "g2": f"      EXECUTE 'SELECT * FROM pyembed._nearest_c{corpus_id}($1, $2)'\n        INTO "
              "hit_ids, hit_distances, hit_scores, hit_docs USING query_embedding, n;\n",
    }
    out = [f"CREATE OR REPLACE FUNCTION pyembed._nearest_c{corpus_id}(q vector, n integer,\n"
           "  OUT ids bigint[], OUT distances float8[], OUT scores float8[], OUT docs bigint[])\n"
           "LANGUAGE plpgsql STABLE AS $$\nBEGIN\n  "
           + static("ids, distances, scores, docs", "q", corpus_id, key, dims) + "END\n$$;\n",
           f"REVOKE EXECUTE ON FUNCTION pyembed._nearest_c{corpus_id} FROM PUBLIC;\n"]
    # pyembed.search's own search_path (sql/090-search-path.sql's), for the variants' SET clauses
    out.append("SELECT set_config('search_path', (SELECT substr(c, 13) FROM pg_catalog.pg_proc, "
               "unnest(proconfig) c WHERE oid = 'pyembed.search(text, vector, text, numeric, "
               "jsonb, text)'::regprocedure AND c LIKE 'search_path=%'), false);\n")
    for name, leg in legs.items():
        body = ranking.replace(EXECUTE, leg).replace(
            "pyembed._vector_ranking(", f"pyembed._vector_ranking_{name}(").replace(
            "  hit_docs bigint[];\n", "  hit_docs bigint[];\n  stmt text;\n  pname text;\n")
        if name in ("pu", "pv"):  # SPI runs no utility statement in a STABLE function
            body = body.replace("LANGUAGE plpgsql STABLE", "LANGUAGE plpgsql VOLATILE")
        out += [body, search.replace("pyembed.search(", f"pyembed.search_{name}(").replace(
                    "pyembed._vector_ranking(", f"pyembed._vector_ranking_{name}("),
                f"ALTER FUNCTION pyembed.search_{name} SET search_path FROM CURRENT;\n",
                f"GRANT EXECUTE ON FUNCTION pyembed.search_{name} TO pyembed_app;\n"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-id", type=int, default=1)
    parser.add_argument("--key", default=KEY)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")
    args = parser.parse_args()
    text = variants(args.corpus_id, args.key, args.dims)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
