"""Tests of the Python bindings against SmolLM2 (run by tests/ffi.rs; or by hand):

    cargo build --release
    python3 bindings/python/test_verity.py [model.gguf]

The model defaults to $VERITY_MODEL, then models/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

import math
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import verity  # noqa: E402
from verity import Runtime, VerityError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = os.environ.get("VERITY_MODEL") or str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTION = "What is 12 + 30? Put the answer in \\boxed{}."


class RuntimeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rt = Runtime(MODEL, learn_min_traces=4)

    @classmethod
    def tearDownClass(cls):
        cls.rt.close()

    def sample(self, **kw):
        args = dict(chat=True, n=4, max_tokens=24, temperature=0.8, seed=7, selection="borda:0.5")
        args.update(kw)
        return self.rt.generate(QUESTION, **args)

    def test_traces_carry_consistent_stats(self):
        r = self.sample(top_logprobs=2)
        self.assertEqual(len(r.traces), 4)
        self.assertEqual(r.selection, "borda:0.5")
        self.assertGreater(r.prompt_tokens, 5)
        ids = {t.id for t in r.traces}
        self.assertEqual(len(ids), 4, "trace ids are distinct")
        for t in r.traces:
            n = len(t.tokens)
            self.assertTrue(1 <= n <= 24, n)
            for column in (t.logprob, t.entropy, t.self_certainty, t.confidence):
                self.assertEqual(len(column), n)
            self.assertTrue(all(lp <= 0.0 for lp in t.logprob), t.logprob)
            self.assertTrue(all(h >= 0.0 for h in t.entropy), t.entropy)
            self.assertIn(t.finish_reason, ("stop", "length"))
            self.assertEqual(len(t.top_logprobs), n)
            for alternatives in t.top_logprobs:
                self.assertEqual(len(alternatives), 2)
                self.assertGreaterEqual(alternatives[0][1], alternatives[1][1])
            mean_lp = sum(t.logprob) / n
            self.assertAlmostEqual(t.scores["logprob"], mean_lp, places=4)
            self.assertIn("self_certainty", t.scores)
            self.assertIsNone(t.reward)
        if r.selected is not None:
            self.assertTrue(0 <= r.selected < 4)
            self.assertEqual(r.traces[r.selected].answer, r.answer)
            self.assertEqual(r.votes[0].answer, r.answer)
            self.assertEqual(sum(v.count for v in r.votes), sum(t.answer is not None for t in r.traces))
        else:
            self.assertIsNone(r.answer)

    def test_same_seed_same_text(self):
        a = self.sample(seed=11)
        b = self.sample(seed=11)
        self.assertEqual([t.text for t in a.traces], [t.text for t in b.traces])
        self.assertEqual([t.tokens for t in a.traces], [t.tokens for t in b.traces])
        c = self.sample(seed=12)
        self.assertNotEqual([t.text for t in a.traces], [t.text for t in c.traces])

    def test_greedy_stop_string_and_streaming(self):
        seen = []
        r = self.rt.generate(
            "The capital of France is",
            n=1,
            max_tokens=16,
            stop=["."],
            on_token=lambda i, tok, text, st: seen.append((i, tok, text, st)),
        )
        t = r.traces[0]
        self.assertNotIn(".", t.text)
        self.assertEqual([tok for _, tok, _, _ in seen], t.tokens)
        self.assertEqual([st["logprob"] for _, _, _, st in seen], t.logprob)
        self.assertTrue(t.text.startswith("".join(text for _, _, text, _ in seen)))
        # A callback that cancels after 3 tokens.
        count = [0]

        def cancel_after_three(*_):
            count[0] += 1
            return count[0] >= 3

        r = self.rt.generate(
            "Once upon a time", n=2, max_tokens=2000, ignore_eos=True, on_token=cancel_after_three
        )
        self.assertTrue(r.cancelled)
        self.assertEqual(count[0], 3)
        self.assertTrue(all(len(t.tokens) < 2000 for t in r.traces))
        self.assertIn("aborted", {t.finish_reason for t in r.traces})

    def test_verifier_and_feedback_and_learning(self):
        calls = []

        def contains_42(text, reference):
            calls.append(reference)
            return 1.0 if reference in text else 0.0

        self.rt.register_verifier("contains", contains_42)
        r = self.sample(n=4, verifier="contains", reference="42")
        self.assertEqual(calls, ["42"] * 4)
        for t in r.traces:
            self.assertEqual(t.reward, 1.0 if "42" in t.text else 0.0)
        with self.assertRaises(VerityError) as e:
            self.rt.feedback(123456789, 1.0)
        self.assertEqual(e.exception.name, "VERITY_ERR_NOT_FOUND")
        self.assertIn("123456789", e.exception.message)
        with self.assertRaises(VerityError) as e:
            self.rt.feedback(r.traces[0].id, math.nan)
        self.assertEqual(e.exception.name, "VERITY_ERR_OUT_OF_RANGE")
        for i, t in enumerate(r.traces):
            self.rt.feedback(t.id, float(i % 2))
        adapter = self.rt.learning_adapter
        before = self.rt.adapter_version(adapter)
        report = self.rt.learn_step()
        self.assertEqual(report.version, self.rt.adapter_version(adapter))
        self.assertEqual(report.version, before + (1 if report.applied else 0))
        if not report.applied:
            self.assertIsNotNone(report.skipped)
        again = self.rt.learn_step()
        self.assertFalse(again.applied)
        self.assertIn("no rewarded traces", again.skipped)
        status = self.rt.status()
        self.assertEqual(status["learning"]["adapter"], adapter)
        self.assertGreaterEqual(status["stats"]["feedback_received"], 4)

    def test_adapters_round_trip(self):
        tmp = tempfile.mkdtemp(prefix="verity-py-")
        try:
            path = self.rt.adapter_save(self.rt.learning_adapter, tmp)
            self.assertTrue(Path(path).is_dir(), path)
            self.rt.adapter_load("copy", path)
            self.assertEqual(self.rt.adapter_version("copy"), 0)
            r = self.rt.generate("Hi", n=1, max_tokens=4, adapter="copy")
            self.assertEqual(r.adapter, "copy")
            r = self.rt.generate("Hi", n=1, max_tokens=4, adapter="base")
            self.assertIsNone(r.adapter)
            self.rt.adapter_remove("copy")
            with self.assertRaises(VerityError) as e:
                self.rt.generate("Hi", adapter="copy")
            self.assertEqual(e.exception.name, "VERITY_ERR_NOT_FOUND")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_concurrent_calls_from_threads(self):
        import threading

        results, errors = {}, []

        def worker(k):
            try:
                results[k] = self.rt.generate("Count: 1, 2,", n=2, max_tokens=8, seed=k, temperature=0.7)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(results), [0, 1, 2, 3])
        ids = [t.id for r in results.values() for t in r.traces]
        self.assertEqual(len(set(ids)), 8, "every trace has its own id")
        self.assertTrue(all(1 <= len(t.tokens) <= 8 for r in results.values() for t in r.traces))

    def test_bad_arguments_raise(self):
        cases = [
            (dict(n=0), "VERITY_ERR_OUT_OF_RANGE"),
            (dict(selection="nope"), "VERITY_ERR_INVALID_ARGUMENT"),
            (dict(temperature=-1.0), "VERITY_ERR_INVALID_ARGUMENT"),
            (dict(adapter="missing"), "VERITY_ERR_NOT_FOUND"),
            (dict(verifier="missing", reference="x"), "VERITY_ERR_NOT_FOUND"),
            (dict(stop=[""]), "VERITY_ERR_INVALID_ARGUMENT"),
        ]
        for kwargs, name in cases:
            with self.assertRaises(VerityError, msg=str(kwargs)) as e:
                self.rt.generate("Hi", max_tokens=2, **kwargs)
            self.assertEqual(e.exception.name, name, kwargs)
            self.assertTrue(e.exception.message)


class LifetimeTest(unittest.TestCase):
    def test_missing_model_and_closed_runtime(self):
        with self.assertRaises(VerityError) as e:
            Runtime("/nonexistent/model.gguf")
        self.assertEqual(e.exception.name, "VERITY_ERR_IO")
        self.assertTrue(verity.version())
        with self.assertRaises(TypeError):
            Runtime(MODEL, no_such_option=1)

    def test_device_option(self):
        with self.assertRaises(VerityError) as e:
            Runtime(MODEL, device="tpu:0")
        self.assertEqual(e.exception.name, "VERITY_ERR_INVALID_ARGUMENT")
        self.assertIn("device 'tpu:0'", e.exception.message)
        with Runtime(MODEL, device="cpu") as rt:
            self.assertEqual(len(rt.generate("Hi", max_tokens=2, ignore_eos=True).traces[0].tokens), 2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        MODEL = sys.argv.pop(1)
    unittest.main(verbosity=2)
