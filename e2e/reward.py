"""Rule-based reward of the end-to-end task (verl's `custom_reward_function`): the share of the response's
letters that are the prompt's letter. Continuous in [0, 1], so responses to one prompt differ in reward."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    letters = [c for c in solution_str.lower() if c.isalpha()]
    if not letters:
        return 0.0
    return sum(c == ground_truth for c in letters) / len(letters)
