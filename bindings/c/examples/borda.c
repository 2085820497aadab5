/*
 * borda.c: eight samples of an arithmetic question, Borda selection, feedback and one
 * learning step, through verity's C ABI.
 *
 *     make -C bindings/c run-example            # after: cargo build --release
 *     bindings/c/build/borda [model.gguf]
 *
 * The reward it reports is agreement with the selected answer (a consensus reward: no
 * reference needed), so the learning step pulls the adapter toward the answer the
 * samples agree on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "verity.h"

#define CHECK(call)                                                                   \
    do {                                                                              \
        verity_status status_ = (call);                                               \
        if (status_ != VERITY_OK) {                                                   \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,  \
                    verity_status_name(status_), verity_last_error());                \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

int main(int argc, char **argv) {
    const char *model = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    printf("verity %s\n", verity_version());

    verity_runtime *rt = NULL;
    verity_runtime_params rparams = verity_runtime_default_params();
    CHECK(verity_runtime_new(model, rparams, &rt));

    verity_generate_params params = verity_generate_default_params();
    params.prompt = "What is 17 * 23? Put the answer in \\boxed{}.";
    params.chat = true;
    params.n = 8;
    params.max_tokens = 128;
    params.temperature = 0.8f;
    params.top_p = 0.95f;
    params.seed = 42;
    params.selection = "borda:0.5";

    verity_result *res = NULL;
    CHECK(verity_generate(rt, &params, &res));

    size_t n = 0;
    CHECK(verity_result_n_traces(res, &n));
    for (size_t i = 0; i < n; i++) {
        const int32_t *tokens = NULL;
        size_t n_tokens = 0;
        double certainty = 0.0;
        const char *answer = NULL;
        CHECK(verity_result_trace_tokens(res, i, &tokens, &n_tokens));
        CHECK(verity_result_trace_score(res, i, "self_certainty", &certainty));
        CHECK(verity_result_trace_answer(res, i, &answer));
        printf("trace %zu: tokens=%zu self_certainty=%.4f answer=%s\n", i, n_tokens,
               certainty, answer ? answer : "(none)");
    }

    size_t selected = 0;
    const char *answer = NULL;
    verity_status status = verity_result_selected(res, &selected);
    CHECK(verity_result_answer(res, &answer));
    if (status == VERITY_OK) {
        printf("selected: %zu\n", selected);
    } else {
        printf("selected: (none)\n");
    }
    printf("answer: %s\n", answer ? answer : "(none)");

    /* Reward: 1 for traces that agree with the selected answer, 0 for the others. */
    for (size_t i = 0; i < n; i++) {
        uint64_t id = 0;
        const char *a = NULL;
        CHECK(verity_result_trace_id(res, i, &id));
        CHECK(verity_result_trace_answer(res, i, &a));
        double reward = (a && answer && strcmp(a, answer) == 0) ? 1.0 : 0.0;
        /* An empty trace is not kept for learning: NOT_FOUND is fine then. */
        verity_status s = verity_feedback(rt, id, reward);
        if (s != VERITY_OK && s != VERITY_ERR_NOT_FOUND) CHECK(s);
    }
    CHECK(verity_result_free(res));

    const char *learning = NULL;
    CHECK(verity_learning_adapter(rt, &learning));
    char adapter[64];
    snprintf(adapter, sizeof adapter, "%s", learning);
    uint64_t before = 0, after = 0;
    CHECK(verity_adapter_version(rt, adapter, &before));
    verity_learn_report report;
    CHECK(verity_learn_step(rt, &report));
    CHECK(verity_adapter_version(rt, adapter, &after));
    printf("learn: applied=%d loss=%.5f reward_mean=%.3f tokens=%zu%s%s\n", report.applied,
           report.loss, report.reward_mean, report.tokens, report.skipped ? " skipped: " : "",
           report.skipped ? report.skipped_reason : "");
    printf("adapter %s: version %llu -> %llu\n", adapter, (unsigned long long)before,
           (unsigned long long)after);

    CHECK(verity_runtime_free(rt));
    return 0;
}
