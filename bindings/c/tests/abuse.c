/*
 * abuse.c: calls every entry point of verity's C ABI with NULL and invalid arguments
 * (bad UTF-8, out-of-range indices, unknown names, freed and made-up handles) and checks
 * the status codes. It must never crash; it exits 0 when every check passes.
 *
 *     bindings/c/build/abuse [model.gguf]
 *
 * Without a model it runs the checks that need no runtime. tests/ffi.rs runs it with
 * SmolLM2, natively and under valgrind when valgrind is installed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "verity.h"

static int failures = 0;
static int checks = 0;

static void expect(verity_status got, verity_status want, const char *what, int line) {
    checks++;
    const char *msg = verity_last_error();
    if (got != want) {
        failures++;
        fprintf(stderr, "FAIL line %d: %s: got %s, want %s (%s)\n", line, what,
                verity_status_name(got), verity_status_name(want), msg);
        return;
    }
    /* The last-error message is set exactly when the call failed. */
    if ((got == VERITY_OK) != (msg[0] == '\0')) {
        failures++;
        fprintf(stderr, "FAIL line %d: %s: status %s but last error \"%s\"\n", line, what,
                verity_status_name(got), msg);
    }
}
#define EXPECT(call, want) expect((call), (want), #call, __LINE__)
#define CHECK(cond)                                                        \
    do {                                                                   \
        checks++;                                                          \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond);        \
        }                                                                  \
    } while (0)

static double half_verifier(const char *text, const char *reference, void *user) {
    (void)text;
    (void)reference;
    (*(int *)user)++;
    return 0.5;
}

static int cancel_after_three(size_t trace, int32_t token, const char *text, size_t len,
                              const verity_token_stats *stats, void *user) {
    (void)trace;
    (void)token;
    (void)stats;
    int *count = user;
    if (text == NULL || strlen(text) > len) return 1; /* NUL-terminated at len */
    return ++*count >= 3;
}

static void without_runtime(void) {
    const char *bad_utf8 = "\xff\xfe";
    verity_runtime *rt = NULL;
    verity_result *res = NULL;
    verity_runtime *made_up = (verity_runtime *)(uintptr_t)0x7f0000001230u;
    verity_result *made_up_res = (verity_result *)(uintptr_t)0x7f0000004560u;
    size_t n = 0;
    uint64_t u = 0;
    double d = 0;
    const char *s = NULL;
    verity_runtime_params rp = verity_runtime_default_params();
    verity_generate_params gp = verity_generate_default_params();

    CHECK(verity_version() != NULL && strlen(verity_version()) > 0);
    CHECK(strcmp(verity_status_name(VERITY_ERR_UTF8), "VERITY_ERR_UTF8") == 0);
    CHECK(strcmp(verity_status_name(-7), "VERITY_UNKNOWN_STATUS") == 0);
    CHECK(rp.kv_budget_tokens > 0 && rp.max_batch > 0 && rp.lora_rank > 0);
    CHECK(gp.n == 1 && gp.max_tokens > 0 && gp.prompt == NULL);

    /* runtime_new */
    EXPECT(verity_runtime_new("models/x.gguf", rp, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_runtime_new(NULL, rp, &rt), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_runtime_new(bad_utf8, rp, &rt), VERITY_ERR_UTF8);
    EXPECT(verity_runtime_new("/nonexistent/model.gguf", rp, &rt), VERITY_ERR_IO);
    CHECK(rt == NULL);
    {
        verity_runtime_params bad = rp;
        bad.config_path = "/nonexistent/verity.toml";
        EXPECT(verity_runtime_new(NULL, bad, &rt), VERITY_ERR_IO);
        bad.config_path = bad_utf8;
        EXPECT(verity_runtime_new(NULL, bad, &rt), VERITY_ERR_UTF8);
        bad = rp;
        bad.adapter_dir = bad_utf8;
        EXPECT(verity_runtime_new("m.gguf", bad, &rt), VERITY_ERR_UTF8);
        bad = rp;
        bad.learn_min_traces = 0;
        EXPECT(verity_runtime_new("m.gguf", bad, &rt), VERITY_ERR_INVALID_ARGUMENT);
    }

    /* Every runtime call with NULL and with a made-up handle. */
    verity_runtime *handles[2] = {NULL, made_up};
    verity_status want[2] = {VERITY_ERR_NULL_POINTER, VERITY_ERR_INVALID_HANDLE};
    for (int h = 0; h < 2; h++) {
        verity_runtime *r = handles[h];
        verity_runtime_stats st;
        verity_learn_report rep;
        gp.prompt = "hi";
        EXPECT(verity_runtime_model_name(r, &s), want[h]);
        EXPECT(verity_runtime_get_stats(r, &st), want[h]);
        EXPECT(verity_runtime_status_json(r, &s), want[h]);
        EXPECT(verity_generate(r, &gp, &res), want[h]);
        EXPECT(verity_generate_stream(r, &gp, cancel_after_three, &n, &res), want[h]);
        EXPECT(verity_register_verifier(r, "v", half_verifier, &n), want[h]);
        EXPECT(verity_feedback(r, 1, 1.0), want[h]);
        EXPECT(verity_learn_step(r, &rep), want[h]);
        EXPECT(verity_learning_start(r, 0), want[h]);
        EXPECT(verity_learning_stop(r), want[h]);
        EXPECT(verity_learning_adapter(r, &s), want[h]);
        EXPECT(verity_adapter_version(r, "learned", &u), want[h]);
        EXPECT(verity_adapter_save(r, "learned", "/tmp", &s), want[h]);
        EXPECT(verity_adapter_load(r, "x", "/tmp"), want[h]);
        EXPECT(verity_adapter_select(r, NULL), want[h]);
        EXPECT(verity_adapter_remove(r, "x"), want[h]);
    }
    EXPECT(verity_runtime_free(NULL), VERITY_OK);
    EXPECT(verity_runtime_free(made_up), VERITY_ERR_INVALID_HANDLE);

    /* Every result call with NULL and with a made-up handle. */
    verity_result *rhandles[2] = {NULL, made_up_res};
    for (int h = 0; h < 2; h++) {
        verity_result *r = rhandles[h];
        verity_trace_stats ts;
        verity_finish_reason fr;
        const int32_t *ids = NULL;
        const float *lps = NULL;
        EXPECT(verity_result_n_traces(r, &n), want[h]);
        EXPECT(verity_result_info(r, &u, &n, &s, &s), want[h]);
        EXPECT(verity_result_trace_text(r, 0, &s, &n), want[h]);
        EXPECT(verity_result_trace_tokens(r, 0, &ids, &n), want[h]);
        EXPECT(verity_result_trace_stats(r, 0, &ts), want[h]);
        EXPECT(verity_result_trace_top_logprobs(r, 0, 0, &ids, &lps, &n), want[h]);
        EXPECT(verity_result_trace_finish_reason(r, 0, &fr), want[h]);
        EXPECT(verity_result_trace_id(r, 0, &u), want[h]);
        EXPECT(verity_result_trace_answer(r, 0, &s), want[h]);
        EXPECT(verity_result_trace_score(r, 0, "logprob", &d), want[h]);
        EXPECT(verity_result_trace_n_scores(r, 0, &n), want[h]);
        EXPECT(verity_result_trace_score_at(r, 0, 0, &s, &d), want[h]);
        EXPECT(verity_result_trace_reward(r, 0, &d), want[h]);
        EXPECT(verity_result_selected(r, &n), want[h]);
        EXPECT(verity_result_answer(r, &s), want[h]);
        EXPECT(verity_result_n_votes(r, &n), want[h]);
        EXPECT(verity_result_vote(r, 0, &s, &d, &n), want[h]);
        EXPECT(verity_result_json(r, &s), want[h]);
    }
    EXPECT(verity_result_free(NULL), VERITY_OK);
    EXPECT(verity_result_free(made_up_res), VERITY_ERR_INVALID_HANDLE);
    /* A successful call clears the last error. */
    EXPECT(verity_result_free(NULL), VERITY_OK);
    CHECK(verity_last_error()[0] == '\0');
}

static void with_runtime(const char *model) {
    const char *bad_utf8 = "\xff\xfe";
    verity_runtime *rt = NULL;
    verity_result *res = NULL;
    size_t n = 0, idx = 0;
    uint64_t u = 0;
    double d = 0;
    const char *s = NULL;
    verity_runtime_params rp = verity_runtime_default_params();
    rp.learn_min_traces = 4;
    if (verity_runtime_new(model, rp, &rt) != VERITY_OK) {
        fprintf(stderr, "FAIL: cannot load %s: %s\n", model, verity_last_error());
        failures++;
        return;
    }

    verity_generate_params gp = verity_generate_default_params();
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_NULL_POINTER); /* prompt NULL */
    gp.prompt = bad_utf8;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_UTF8);
    gp.prompt = "The capital of France is";
    EXPECT(verity_generate(rt, NULL, &res), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_generate(rt, &gp, NULL), VERITY_ERR_NULL_POINTER);
    CHECK(res == NULL);
    gp.n = 0;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_OUT_OF_RANGE);
    gp.n = (size_t)-1;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_OUT_OF_RANGE);
    gp.n = 2;
    gp.max_tokens = 0;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_OUT_OF_RANGE);
    gp.max_tokens = 4;
    gp.n_stop = 2; /* stop is NULL */
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_NULL_POINTER);
    {
        const char *stops[2] = {".", bad_utf8};
        gp.stop = stops;
        EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_UTF8);
        const char *empty[1] = {""};
        gp.stop = empty;
        gp.n_stop = 1;
        EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
        gp.n_stop = 100000;
        EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_OUT_OF_RANGE);
        gp.stop = NULL;
        gp.n_stop = 0;
    }
    gp.temperature = -1.0f;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
    gp.temperature = NAN;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
    gp.temperature = 0.0f;
    gp.top_p = 0.0f;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
    gp.top_p = 1.0f;
    gp.top_logprobs = 1u << 20;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_OUT_OF_RANGE);
    gp.top_logprobs = 0;
    gp.adapter = "no-such-adapter";
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_NOT_FOUND);
    gp.adapter = bad_utf8;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_UTF8);
    gp.adapter = NULL;
    gp.selection = "borda:-1";
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
    gp.selection = "no-such-rule";
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
    gp.selection = NULL;
    gp.verifier = "math"; /* reference missing */
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_ARGUMENT);
    gp.verifier = "no-such-verifier";
    gp.reference = "Paris";
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_NOT_FOUND);
    gp.verifier = NULL;
    gp.reference = NULL;
    CHECK(res == NULL);

    /* A host verifier, a selection rule and top log-probs on a real request. */
    int verifier_calls = 0;
    EXPECT(verity_register_verifier(rt, NULL, half_verifier, &verifier_calls),
           VERITY_ERR_NULL_POINTER);
    EXPECT(verity_register_verifier(rt, "half", NULL, &verifier_calls), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_register_verifier(rt, bad_utf8, half_verifier, &verifier_calls),
           VERITY_ERR_UTF8);
    EXPECT(verity_register_verifier(rt, " ", half_verifier, &verifier_calls),
           VERITY_ERR_INVALID_ARGUMENT);
    EXPECT(verity_register_verifier(rt, "half", half_verifier, &verifier_calls), VERITY_OK);
    gp.verifier = "half";
    gp.reference = "Paris";
    gp.selection = "majority";
    gp.top_logprobs = 3;
    EXPECT(verity_generate(rt, &gp, &res), VERITY_OK);
    CHECK(verifier_calls == 2);
    gp.verifier = NULL;
    gp.reference = NULL;
    gp.top_logprobs = 0;

    EXPECT(verity_result_n_traces(res, &n), VERITY_OK);
    CHECK(n == 2);
    EXPECT(verity_result_n_traces(res, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_info(res, NULL, NULL, NULL, NULL), VERITY_OK);
    EXPECT(verity_result_info(res, &u, &n, &s, &s), VERITY_OK);
    CHECK(s != NULL && strcmp(s, "majority") == 0);
    EXPECT(verity_result_trace_text(res, 2, &s, &n), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_trace_text(res, (size_t)-1, &s, &n), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_trace_text(res, 0, NULL, &n), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_trace_text(res, 0, &s, NULL), VERITY_OK);
    EXPECT(verity_result_trace_text(res, 0, &s, &n), VERITY_OK);
    CHECK(s != NULL && strlen(s) == n);
    {
        const int32_t *toks = NULL;
        const float *lps = NULL;
        size_t nt = 0, k = 0;
        verity_trace_stats ts;
        EXPECT(verity_result_trace_tokens(res, 5, &toks, &nt), VERITY_ERR_OUT_OF_RANGE);
        EXPECT(verity_result_trace_tokens(res, 0, NULL, &nt), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_tokens(res, 0, &toks, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_tokens(res, 0, &toks, &nt), VERITY_OK);
        CHECK(nt >= 1 && nt <= 4);
        EXPECT(verity_result_trace_stats(res, 9, &ts), VERITY_ERR_OUT_OF_RANGE);
        EXPECT(verity_result_trace_stats(res, 0, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_stats(res, 0, &ts), VERITY_OK);
        CHECK(ts.n == nt);
        for (size_t t = 0; t < ts.n; t++) {
            CHECK(ts.logprob[t] <= 0.0f && ts.entropy[t] >= 0.0f);
        }
        EXPECT(verity_result_trace_top_logprobs(res, 0, nt, &toks, &lps, &k),
               VERITY_ERR_OUT_OF_RANGE);
        EXPECT(verity_result_trace_top_logprobs(res, 0, 0, NULL, &lps, &k),
               VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_top_logprobs(res, 0, 0, &toks, &lps, &k), VERITY_OK);
        CHECK(k == 3 && lps[0] >= lps[1] && lps[1] >= lps[2]);
    }
    {
        verity_finish_reason fr;
        EXPECT(verity_result_trace_finish_reason(res, 2, &fr), VERITY_ERR_OUT_OF_RANGE);
        EXPECT(verity_result_trace_finish_reason(res, 0, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_finish_reason(res, 0, &fr), VERITY_OK);
        CHECK(fr == VERITY_FINISH_STOP || fr == VERITY_FINISH_LENGTH);
    }
    EXPECT(verity_result_trace_id(res, 2, &u), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_trace_id(res, 0, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_trace_answer(res, 2, &s), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_trace_answer(res, 0, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_trace_answer(res, 0, &s), VERITY_OK);
    EXPECT(verity_result_trace_score(res, 0, NULL, &d), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_trace_score(res, 0, bad_utf8, &d), VERITY_ERR_UTF8);
    EXPECT(verity_result_trace_score(res, 0, "no-such-score", &d), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_result_trace_score(res, 0, "logprob", NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_trace_score(res, 3, "logprob", &d), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_trace_score(res, 0, "logprob", &d), VERITY_OK);
    CHECK(d <= 0.0);
    {
        size_t ns = 0;
        const char *name = NULL;
        EXPECT(verity_result_trace_n_scores(res, 2, &ns), VERITY_ERR_OUT_OF_RANGE);
        EXPECT(verity_result_trace_n_scores(res, 0, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_n_scores(res, 0, &ns), VERITY_OK);
        CHECK(ns >= 3);
        EXPECT(verity_result_trace_score_at(res, 0, ns, &name, &d), VERITY_ERR_OUT_OF_RANGE);
        EXPECT(verity_result_trace_score_at(res, 0, 0, NULL, &d), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_result_trace_score_at(res, 0, 0, &name, NULL), VERITY_ERR_NULL_POINTER);
        for (size_t k = 0; k < ns; k++) {
            double by_name = 0;
            EXPECT(verity_result_trace_score_at(res, 0, k, &name, &d), VERITY_OK);
            EXPECT(verity_result_trace_score(res, 0, name, &by_name), VERITY_OK);
            CHECK(by_name == d);
        }
    }
    EXPECT(verity_result_trace_reward(res, 2, &d), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_trace_reward(res, 0, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_trace_reward(res, 1, &d), VERITY_OK);
    CHECK(d == 0.5);
    EXPECT(verity_result_selected(res, NULL), VERITY_ERR_NULL_POINTER);
    {
        verity_status st = verity_result_selected(res, &idx);
        CHECK(st == VERITY_OK || st == VERITY_ERR_NOT_FOUND);
        if (st == VERITY_OK) CHECK(idx < 2);
    }
    EXPECT(verity_result_answer(res, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_answer(res, &s), VERITY_OK);
    EXPECT(verity_result_n_votes(res, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_n_votes(res, &n), VERITY_OK);
    EXPECT(verity_result_vote(res, n, &s, &d, &idx), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_result_vote(res, 0, NULL, &d, &idx), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_json(res, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_result_json(res, &s), VERITY_OK);
    CHECK(s != NULL && s[0] == '{');

    /* Feedback: unknown ids, non-finite rewards, then real ones. */
    EXPECT(verity_feedback(rt, 0, 1.0), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_feedback(rt, (uint64_t)-1, 1.0), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_result_trace_id(res, 0, &u), VERITY_OK);
    EXPECT(verity_feedback(rt, u, NAN), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_feedback(rt, u, 1e308), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_feedback(rt, u, INFINITY), VERITY_ERR_OUT_OF_RANGE);
    EXPECT(verity_feedback(rt, u, 1.0), VERITY_OK);

    /* A freed result is an error, not a crash; so is a result passed as a runtime. */
    EXPECT(verity_generate(rt, &gp, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_runtime_free((verity_runtime *)res), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_feedback((verity_runtime *)res, u, 1.0), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_result_free(res), VERITY_OK);
    EXPECT(verity_result_free(res), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_result_n_traces(res, &n), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_result_trace_text(res, 0, &s, &n), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_result_free((verity_result *)rt), VERITY_ERR_INVALID_HANDLE);

    /* Streaming: the callback cancels after three tokens; *out holds the result so far. */
    {
        int count = 0;
        gp.max_tokens = 2000; /* (so the cancel lands long before the end, however slow the callback) */
        gp.ignore_eos = true;
        res = NULL;
        EXPECT(verity_generate_stream(rt, &gp, cancel_after_three, &count, &res),
               VERITY_ERR_CANCELLED);
        CHECK(res != NULL && count == 3);
        verity_finish_reason fr;
        EXPECT(verity_result_trace_finish_reason(res, 0, &fr), VERITY_OK);
        CHECK(fr == VERITY_FINISH_ABORTED);
        EXPECT(verity_result_free(res), VERITY_OK);
        gp.max_tokens = 4;
        gp.ignore_eos = false;
        EXPECT(verity_generate_stream(rt, &gp, NULL, NULL, &res), VERITY_OK);
        EXPECT(verity_result_free(res), VERITY_OK);
    }

    /* Learning and adapters. */
    {
        verity_learn_report rep;
        verity_runtime_stats st;
        EXPECT(verity_runtime_get_stats(rt, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_runtime_get_stats(rt, &st), VERITY_OK);
        CHECK(st.requests >= 3 && st.feedback_pending >= 1);
        EXPECT(verity_runtime_status_json(rt, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_runtime_status_json(rt, &s), VERITY_OK);
        CHECK(strstr(s, "\"adapters\"") != NULL);
        EXPECT(verity_runtime_model_name(rt, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_learning_adapter(rt, NULL), VERITY_ERR_NULL_POINTER);
        EXPECT(verity_learning_start(rt, 0), VERITY_OK);
        EXPECT(verity_learning_start(rt, 0), VERITY_OK); /* idempotent */
        EXPECT(verity_learning_stop(rt), VERITY_OK);
        EXPECT(verity_learning_stop(rt), VERITY_OK);
        EXPECT(verity_learn_step(rt, NULL), VERITY_OK);
        EXPECT(verity_learn_step(rt, &rep), VERITY_OK); /* nothing pending now */
        CHECK(rep.skipped && !rep.applied && rep.skipped_reason != NULL);
    }
    EXPECT(verity_adapter_version(rt, NULL, &u), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_adapter_version(rt, "learned", NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_adapter_version(rt, "no-such-adapter", &u), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_adapter_version(rt, bad_utf8, &u), VERITY_ERR_UTF8);
    EXPECT(verity_adapter_version(rt, "learned", &u), VERITY_OK);
    EXPECT(verity_adapter_select(rt, "no-such-adapter"), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_adapter_select(rt, bad_utf8), VERITY_ERR_UTF8);
    EXPECT(verity_adapter_select(rt, "base"), VERITY_OK);
    EXPECT(verity_adapter_select(rt, NULL), VERITY_OK);
    EXPECT(verity_adapter_select(rt, "learned"), VERITY_OK);
    EXPECT(verity_adapter_remove(rt, NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_adapter_remove(rt, "no-such-adapter"), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_adapter_remove(rt, "learned"), VERITY_ERR_INVALID_ARGUMENT);
    EXPECT(verity_adapter_save(rt, NULL, "/tmp", &s), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_adapter_save(rt, "no-such-adapter", "/tmp", &s), VERITY_ERR_NOT_FOUND);
    EXPECT(verity_adapter_save(rt, "learned", NULL, &s), VERITY_ERR_INVALID_ARGUMENT);
    EXPECT(verity_adapter_save(rt, "learned", bad_utf8, &s), VERITY_ERR_UTF8);
    EXPECT(verity_adapter_load(rt, "x", NULL), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_adapter_load(rt, NULL, "/tmp"), VERITY_ERR_NULL_POINTER);
    EXPECT(verity_adapter_load(rt, "base", "/tmp"), VERITY_ERR_INVALID_ARGUMENT);
    EXPECT(verity_adapter_load(rt, "../evil", "/tmp"), VERITY_ERR_INVALID_ARGUMENT);
    EXPECT(verity_adapter_load(rt, "x", "/nonexistent/adapter"), VERITY_ERR_IO);
    EXPECT(verity_adapter_load(rt, "x", bad_utf8), VERITY_ERR_UTF8);

    /* A freed runtime is an error, not a crash. */
    EXPECT(verity_runtime_free(rt), VERITY_OK);
    EXPECT(verity_runtime_free(rt), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_generate(rt, &gp, &res), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_feedback(rt, u, 1.0), VERITY_ERR_INVALID_HANDLE);
    EXPECT(verity_adapter_version(rt, "learned", &u), VERITY_ERR_INVALID_HANDLE);
}

int main(int argc, char **argv) {
    without_runtime();
    if (argc > 1) {
        with_runtime(argv[1]);
    } else {
        printf("no model given: only the checks without a runtime ran\n");
    }
    printf("abuse: %d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
