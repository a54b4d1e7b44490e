"""Budgets from Python on the host backing: two models of one process under a vmmpp.Budget
(refusals by the model's limit and by the global one, with their numbers; limits changed at run
time, pending until live blocks fit), a cache's own budget_bytes (host included), a process budget
(vmmpp.ProcessBudget) as vmmpp-budget sees it, and the statistics as dicts and JSON."""
import json
import os
import unittest

import vmmpp

# A block is 32 KiB; the host pool commits 2 MiB pages: 64 blocks (1024 tokens) a page.
GEOMETRY = dict(layers=2, kv_heads=2, head_dim=64, dtype="f32", block_tokens=16, max_blocks=1024, config="host")
PAGE_BYTES = 2 << 20
PAGE_TOKENS = 1024


class BudgetTest(unittest.TestCase):
    def test_two_models_share_one_budget(self):
        gpu = vmmpp.Budget(3 * PAGE_BYTES)
        a = vmmpp.KVCache(**GEOMETRY, budget=gpu, model="a", model_limit_bytes=2 * PAGE_BYTES)
        b = vmmpp.KVCache(**GEOMETRY, budget=gpu, model="b", model_limit_bytes=2 * PAGE_BYTES)
        sa = a.add_sequence()
        a.append(sa, 2 * PAGE_TOKENS)
        with self.assertRaises(vmmpp.OverQuota) as e:  # a's own limit
            a.append(sa, 1)
        self.assertEqual((e.exception.which, e.exception.requested, e.exception.in_use, e.exception.limit),
                         ("model a", PAGE_BYTES, 2 * PAGE_BYTES, 2 * PAGE_BYTES))
        self.assertEqual(e.exception.status, "over_quota")
        sb = b.add_sequence()
        b.append(sb, PAGE_TOKENS)
        with self.assertRaises(vmmpp.OverQuota) as e:  # the global limit, b under its own
            b.append(sb, 1)
        self.assertEqual((e.exception.which, e.exception.limit), ("global", 3 * PAGE_BYTES))
        stats = gpu.stats()
        self.assertEqual((stats["limit"], stats["committed"], stats["denied"]), (3 * PAGE_BYTES, 3 * PAGE_BYTES, 2))
        self.assertEqual([(m["name"], m["committed"]) for m in stats["models"]], [("a", 2 * PAGE_BYTES),
                                                                                  ("b", PAGE_BYTES)])
        a.free(sa)
        b.append(sb, 1)  # a's pages went back to the budget
        snap = json.loads(vmmpp.stats_json({"a": a, "b": b}, gpu))
        self.assertEqual([p["name"] for p in snap["pools"]], ["a", "b"])
        self.assertEqual(snap["pools"][1]["model"]["name"], "b")
        self.assertEqual(snap["budget"]["committed"], 2 * PAGE_BYTES)
        self.assertEqual(json.loads(gpu.stats_json())["budget"]["limit"], 3 * PAGE_BYTES)
        b.close()
        a.close()
        self.assertEqual(gpu.stats()["models"], [])  # unloaded: the names are free again

    def test_limits_change_at_run_time(self):
        gpu = vmmpp.Budget(4 * PAGE_BYTES)
        with vmmpp.KVCache(**GEOMETRY, budget=gpu, model="a", model_limit_bytes=4 * PAGE_BYTES) as a:
            s = a.add_sequence()
            a.append(s, 2 * PAGE_TOKENS)
            change = gpu.set_model_limit("a", PAGE_BYTES)
            self.assertEqual((change["status"], change["applied"], change["limit"], change["previous"],
                              change["bytes_over"]), ("pending", False, PAGE_BYTES, 4 * PAGE_BYTES, PAGE_BYTES))
            with self.assertRaises(vmmpp.OverQuota):
                a.append(a.add_sequence(), 1)
            a.truncate(s, PAGE_TOKENS)
            a.synchronize()
            self.assertEqual(gpu.stats()["models"][0]["over"], 0)
            self.assertTrue(gpu.set_limit(8 * PAGE_BYTES)["applied"])
            with self.assertRaises(vmmpp.UnknownModel) as e:
                gpu.set_model_limit("b", PAGE_BYTES)
            self.assertIsInstance(e.exception, vmmpp.InvalidArgument)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "must not be zero"):
                gpu.set_limit(0)

    def test_a_budget_needs_a_model_and_its_limit(self):
        gpu = vmmpp.Budget(PAGE_BYTES)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "needs model= .* and model_limit_bytes="):
            vmmpp.KVCache(**GEOMETRY, budget=gpu, model="a")
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "no budget was given"):
            vmmpp.KVCache(**GEOMETRY, model="a", model_limit_bytes=PAGE_BYTES)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "budget must be a vmmpp.Budget or a vmmpp.ProcessBudget"):
            vmmpp.KVCache(**GEOMETRY, budget=PAGE_BYTES, model="a", model_limit_bytes=PAGE_BYTES)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "configuration for a budget"):
            vmmpp.KVCache(**dict(GEOMETRY, config="static"), budget=gpu, model="a", model_limit_bytes=PAGE_BYTES)
        with vmmpp.KVCache(**GEOMETRY, budget=gpu, model="a", model_limit_bytes=PAGE_BYTES):
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "'a'"):  # one model of a name at a time
                vmmpp.KVCache(**GEOMETRY, budget=gpu, model="a", model_limit_bytes=PAGE_BYTES)

    def test_budget_bytes_is_kept_by_host_caches(self):
        with vmmpp.KVCache(**GEOMETRY, budget_bytes=PAGE_BYTES) as c:
            s = c.add_sequence()
            c.append(s, PAGE_TOKENS)
            with self.assertRaises(vmmpp.OverQuota) as e:
                c.append(s, 1)
            self.assertEqual(e.exception.limit, PAGE_BYTES)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "budget_bytes: the 'static' configuration is charged to "
                                                           "no budget"):
            vmmpp.KVCache(**dict(GEOMETRY, config="static"), budget_bytes=PAGE_BYTES)


class ProcessBudgetTest(unittest.TestCase):
    def setUp(self):
        self.name = f"vmmpp-py-test-{os.getpid()}"
        vmmpp.remove_process_budget(self.name)

    def tearDown(self):
        vmmpp.remove_process_budget(self.name)

    def test_a_cache_charged_to_a_process_budget(self):
        budget = vmmpp.ProcessBudget.create_or_open(self.name, 2 * PAGE_BYTES)
        self.assertEqual(budget.name, self.name)
        with vmmpp.KVCache(**GEOMETRY, budget=budget, model="m", model_limit_bytes=PAGE_BYTES) as c:
            s = c.add_sequence()
            c.append(s, PAGE_TOKENS)
            with self.assertRaises(vmmpp.OverQuota) as e:
                c.append(s, 1)
            self.assertEqual(e.exception.which, "model m")
            stats = vmmpp.process_budget_stats(self.name)
            self.assertEqual((stats["limit"], stats["committed"]), (2 * PAGE_BYTES, PAGE_BYTES))
            self.assertEqual(stats["models"][0]["name"], "m")
            snap = json.loads(budget.stats_json())
            self.assertEqual(snap["process_budget"]["name"], self.name)
            self.assertFalse(budget.set_model_limit("m", PAGE_BYTES // 2)["applied"])
        with vmmpp.ProcessBudgetCache(**GEOMETRY, budget_name=self.name, model="n",
                                      model_limit_bytes=PAGE_BYTES) as c:
            c.append(c.add_sequence(), 10)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "layout for a process budget"):
            vmmpp.KVCache(**GEOMETRY, layout="mla", budget=budget, model="o", model_limit_bytes=PAGE_BYTES)
        self.assertTrue(vmmpp.remove_process_budget(self.name))
        with self.assertRaises(vmmpp.NoSuchSegment):
            vmmpp.ProcessBudget.open(self.name)


if __name__ == "__main__":
    unittest.main()
